"""Per target of a recipe: produce time, peak RSS while producing, artifact size and perplexity. It runs the real
build (quantkit.build.run_build) into a fresh store, so cached artifacts never hide a cost.

    .venv/bin/python scripts/bench_formats.py [RECIPE] [--target NAME] [--store DIR] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("QUANTKIT_DATA", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def count_produce_cpu(loaded) -> dict[str, float]:
    """CPU seconds (user + sys) of each target's produce: on a shared host wall time mostly measures the
    neighbours. Wraps the registered formats' produce; the build itself is untouched."""
    from quantkit.formats import get_format

    cpu: dict[str, float] = {}
    for fmt in {get_format(t.format) for t in loaded.targets}:
        def timed(ctx, opts, out_dir, _produce=fmt.produce):
            t0 = time.process_time()
            try:
                return _produce(ctx, opts, out_dir)
            finally:
                cpu[opts.name] = round(time.process_time() - t0, 1)
        fmt.produce = timed
    return cpu


def rows(result, cpu: dict[str, float]) -> list[dict]:
    """One row per artifact from BuildResult.stages (time, RSS) and its manifest (size, ppl)."""
    stages = {s["stage"]: s for s in result.stages}
    base = next((m for m in result.manifests if m["target"]["format"] == "baseline"), None)
    out = []
    for m in result.manifests:
        name = m["target"]["name"]
        produce, evaluate = stages.get(f"{name}: produce", {}), stages.get(f"{name}: evaluate", {})
        exports = m["info"].get("exports", {})
        row = {"target": name, "scheme": m["target"]["scheme"], "cached": m["id"] in result.cached,
               "produce_s": produce.get("wall_s"), "produce_cpu_s": cpu.get(name), "produce_peak_rss_mb": produce.get("peak_rss_mb"),
               "evaluate_s": evaluate.get("wall_s"),
               "size_mb": round(m["info"].get("entry_bytes", m.get("total_size", 0)) / 1e6, 1),
               "export_mb": {k: round(v["bytes"] / 1e6, 1) for k, v in exports.items()},
               "readback_max_abs_diff": {k: v["readback"]["max_abs_diff"] for k, v in exports.items()},
               "ppl": {}}
        if name == "baseline":
            row["size_mb"] = round(m["info"].get("weight_bytes", 0) / 1e6, 1)
        for ds, met in sorted(m.get("metrics", {}).get("perplexity", {}).items()):
            b = base and base["metrics"].get("perplexity", {}).get(ds)
            delta = 100 * (met["ppl"] / b["ppl"] - 1) if b and b.get("key") == met.get("key") else None
            row["ppl"][ds] = {"ppl": round(met["ppl"], 3), "change_pct": None if delta is None else round(delta, 2)}
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe", nargs="?", default=str(ROOT / "recipes" / "smollm2-135m-demo.yaml"))
    ap.add_argument("--target", action="append", help="only this target (plus the baseline); repeatable")
    ap.add_argument("--store", default=None, help="store dir (default: a fresh temporary one)")
    ap.add_argument("--json", action="store_true", help="print rows as JSON instead of a table")
    args = ap.parse_args()
    store = args.store or tempfile.mkdtemp(prefix="quantkit-bench-formats-")

    from quantkit.build import run_build
    from quantkit.recipe.loader import load_recipe
    from quantkit.util import host_info, library_versions

    loaded = load_recipe(args.recipe)
    cpu = count_produce_cpu(loaded)
    result = run_build(loaded, only_target=args.target, store=store, console=Console(stderr=True))
    rs = rows(result, cpu)
    total = next(s for s in result.stages if s["stage"] == "total")
    if args.json:
        print(json.dumps({"recipe": loaded.recipe.name, "rows": rs, "stages": result.stages}, indent=2))
        return
    datasets = sorted({d for r in rs for d in r["ppl"]})
    c = loaded.recipe.calibration
    t = Table(title=f"bench_formats: {Path(args.recipe).name} (calibration {c.num_samples} x {c.seq_len}), "
                    f"store {store}")
    for col in ("target", "scheme", "produce s", "produce CPU s", "peak RSS MB", "size MB", "export MB", *[f"ppl {d}" for d in datasets]):
        t.add_column(col, justify="left" if col in ("target", "scheme") else "right")
    for r in rs:
        ppl = [f"{p['ppl']:.3f}" + (f" ({p['change_pct']:+.1f}%)" if p["change_pct"] is not None else "")
               if (p := r["ppl"].get(d)) else "" for d in datasets]
        produce = "cached" if r["cached"] else f"{r['produce_s']:.1f}" if r["produce_s"] is not None else ""
        rss = f"{r['produce_peak_rss_mb']:.0f}" if r["produce_peak_rss_mb"] else ""
        export = ", ".join(f"{k} {v}" + ("" if r["readback_max_abs_diff"][k] == 0 else " MISMATCH")
                           for k, v in r["export_mb"].items())
        cpu_s = f"{r['produce_cpu_s']:.1f}" if r["produce_cpu_s"] is not None else ""
        t.add_row(r["target"], r["scheme"], produce, cpu_s, rss, f"{r['size_mb']:.1f}", export, *ppl)
    out = Console(width=200)
    out.print(t)
    h, v = host_info(), library_versions()
    out.print(f"build total {total['wall_s']:.0f} s, process peak RSS {total['peak_rss_mb']:.0f} MB; host "
              f"{h['platform']}, {h['cpus']} cpus; torch {v.get('torch')}, llmcompressor {v.get('llmcompressor')}",
              highlight=False)


if __name__ == "__main__":
    main()
