"""How many perplexity windows a table needs: per-window NLL of every artifact in a store, paired with the
baseline's on the same windows, and the standard error of each row's ppl change for fewer windows.

A row's change is exp(mean_i d_i) - 1 with d_i = NLL(artifact, window i) - NLL(baseline, window i) (mean per
token). Both models score the same windows, so the window-to-window spread of the text itself cancels and only
the spread of d_i matters: SE(change) ~= exp(mean d) * sd(d) / sqrt(n). A window count is good enough when that
SE stays well below the changes the table shows (the demo recipe's choice is documented from this output).

    .venv/bin/python scripts/bench_eval_windows.py RECIPE --store DIR [--windows 48] [--counts 8,12,16,24]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("QUANTKIT_DATA", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def per_window_nll(engine, handle, ids) -> list[float]:
    """Mean NLL per token of each window, through the engine's own `nll` (one window per call)."""
    out = []
    for i in range(ids.shape[0]):
        total, count = engine.nll(handle, ids[i:i + 1], batch_size=1)
        out.append(total / count)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--store", required=True, help="store holding the artifacts (built with this recipe's model)")
    ap.add_argument("--windows", type=int, default=48, help="windows scored per dataset")
    ap.add_argument("--counts", default="8,12,16,24", help="window counts to report the standard error for")
    ap.add_argument("--target", action="append", help="only these targets (repeatable; default: all)")
    args = ap.parse_args()

    from quantkit.context import BuildContext
    from quantkit.evaluation.engines import get_engine
    from quantkit.evaluation.perplexity import make_windows
    from quantkit.recipe.loader import load_recipe
    from quantkit.sources.resolve import resolve_source
    from quantkit.store.store import Store
    from quantkit.util import host_info

    loaded = load_recipe(args.recipe)
    source = resolve_source(loaded.recipe.model, base_dir=loaded.path.parent)
    ctx = BuildContext(loaded, source, Path("/tmp"))
    seq_len = loaded.recipe.eval.perplexity.seq_len if loaded.recipe.eval.perplexity else 512
    datasets = loaded.recipe.eval.perplexity.datasets if loaded.recipe.eval.perplexity else ["wikitext2", "c4"]
    windows = {d: make_windows(d, ctx.tokenizer, ctx.tokenizer_fingerprint, seq_len, args.windows) for d in datasets}
    st = Store(args.store)
    arts = [("baseline", "transformers", source.path, ".")]
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "bench-eval-windows"
    for m in st.list():
        if m["source"]["fingerprint"] != source.fingerprint or not m["files"]:
            continue
        if args.target and m["target"]["name"] not in args.target:
            continue
        arts.append((m["target"]["name"], m["engine"], st.materialize(m["id"], work / m["id"]), m["entry"]))

    nll: dict[str, dict[str, list[float]]] = {}
    for name, engine_name, path, entry in arts:
        engine = get_engine(engine_name)
        handle = engine.load(Path(path), entry, dtype=loaded.recipe.model.dtype)
        for d, w in windows.items():
            t0 = time.perf_counter()
            nll.setdefault(name, {})[d] = per_window_nll(engine, handle, w.ids)
            print(f"{name} {d}: {len(w.ids)} windows in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        del handle

    counts = [int(c) for c in args.counts.split(",")]
    print(f"# Per-window NLL spread ({loaded.recipe.name}, seq_len {seq_len}, {args.windows} windows per dataset)\n")
    print(f"host: {host_info()}\n")
    for d in datasets:
        base = nll["baseline"][d]
        print(f"## {d}: baseline ppl {math.exp(statistics.fmean(base)):.3f}, per-window NLL sd "
              f"{statistics.stdev(base):.3f} (the unpaired SE of the ppl itself at {args.windows} windows: "
              f"{100 * statistics.stdev(base) / math.sqrt(args.windows):.2f} %; the paired SE below is what a "
              "change needs)\n")
        head = ["target", "engine", f"Δ % ({args.windows} w)", "sd(d)"] + [f"Δ % / SE @{n}" for n in counts]
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for name, engine_name, *_ in arts[1:]:
            diff = [a - b for a, b in zip(nll[name][d], base)]
            sd = statistics.stdev(diff)
            cells = [name, engine_name, f"{100 * math.expm1(statistics.fmean(diff)):+.2f}", f"{sd:.4f}"]
            for n in counts:
                mean_n = statistics.fmean(diff[:n])
                se = 100 * math.exp(mean_n) * sd / math.sqrt(n)
                cells.append(f"{100 * math.expm1(mean_n):+.2f} ± {se:.2f}")
            print("| " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main()
