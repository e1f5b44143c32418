"""Issue 15's measurement: a recipe built once, then built again (a new `quantkit build` process each time)
1. as is: the plain cache hit;
2. with $QUANTKIT_DATA pointing at a byte-identical copy of the data and the model copied to another directory
   (first time there: its files are hashed once, nothing is produced or measured);
3. the same again (the hashes are memoised by path, size and mtime).
Prints each run's wall time, what it built and whether it measured anything.

    .venv/bin/python scripts/bench_relocate.py [RECIPE] [--max-windows N] [--store DIR] [--target NAME ...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("QUANTKIT_DATA", ROOT.parent / "shared" / "data"))


def recipe_at(where: Path, base: Path, model: Path, store: Path, max_windows: int | None) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    windows = f"\neval: {{perplexity: {{max_windows: {max_windows}}}}}" if max_windows else ""
    f = where / "recipe.yaml"
    f.write_text(f"extends: {base}\nmodel: {{source: {model}}}\nstore: {{uri: {store}}}{windows}\n")
    return f


def build(recipe: Path, data: Path, label: str, targets: list[str]) -> dict:
    env = {**os.environ, "QUANTKIT_DATA": str(data), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "quantkit.cli", "build", str(recipe), "--json", "--report-dir",
                        str(recipe.parent / "reports"), *(a for t in targets for a in ("--target", t))],
                       capture_output=True, text=True, env=env, cwd=recipe.parent)
    wall = time.perf_counter() - t0
    if r.returncode not in (0, 3):
        sys.exit(f"{label}: exit {r.returncode}\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout)
    measured = [line.strip() for line in r.stderr.splitlines() if "measuring" in line]
    return {"run": label, "wall_s": round(wall, 2), "built": len(out["built"]), "cached": len(out["cached"]),
            "measured_again": measured, "rows": out["rows"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe", nargs="?", default=str(ROOT / "recipes" / "smollm2-135m-fp8.yaml"))
    ap.add_argument("--max-windows", type=int, default=None, help="fewer perplexity windows (a faster first build)")
    ap.add_argument("--store", type=Path, default=None, help="store dir (default: a fresh one)")
    ap.add_argument("--target", action="append", default=[], help="only these targets (and the baseline)")
    args = ap.parse_args()
    base = Path(args.recipe).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="quantkit-relocate-"))
    store = args.store or tmp / "store"
    import yaml

    from quantkit.recipe.loader import load_recipe

    source = Path(load_recipe(base).recipe.model.source)
    model = (base.parent / source).resolve() if not source.is_absolute() else source
    runs = []
    here = recipe_at(tmp / "a", base, model, store, args.max_windows)
    runs.append(build(here, DATA, "first build" + ("" if args.store else " (empty store)"), args.target))
    runs.append(build(here, DATA, "again, same places (plain cache hit)", args.target))
    data_copy, model_copy = tmp / "elsewhere" / "data", tmp / "elsewhere" / "models" / model.name
    shutil.copytree(DATA, data_copy)
    shutil.copytree(model, model_copy)
    there = recipe_at(tmp / "elsewhere" / "recipe", base, model_copy, store, args.max_windows)
    runs.append(build(there, data_copy, "data and model copied elsewhere (first time there)", args.target))
    runs.append(build(there, data_copy, "again, copied places", args.target))
    same_rows = all(r["rows"] == runs[0]["rows"] for r in runs[1:])
    for r in runs:
        print(f"{r['run']:<52} {r['wall_s']:>8.2f} s   built {r['built']}, from store {r['cached']}, "
              f"measured again: {', '.join(r['measured_again']) or 'nothing'}")
    size = sum(f.stat().st_size for f in model.rglob("*") if f.is_file()) / 1e6
    print(f"model {model} ({size:.0f} MB), data {DATA} -> copies under {tmp / 'elsewhere'}; "
          f"report rows identical in every run: {same_rows}")
    print(yaml.safe_dump({"host": os.uname().nodename, "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                          "recipe": str(base), "max_windows": args.max_windows, "targets": args.target or "all",
                          "store": str(store)}, sort_keys=False), end="")
    shutil.rmtree(tmp / "elsewhere", ignore_errors=True)


if __name__ == "__main__":
    main()
