"""Correctness before speed, on the GPU: every artifact of a build scored by the `torch-compiled` engine on the
windows its own engine scored in the build (same key), perplexity ratio within --tol (issue 11: 0.5 %).

  python scripts/gpu_crosscheck.py STORE_URI RECIPE_NAME [--out FILE] [--tol 0.005]

Reads the store's manifests (the build's own perplexity records are the oracle), materializes each artifact,
loads it with the compiled engine's kernels (as timed; no torch.compile: scoring shapes vary) and prints one
line per artifact and dataset. Exit 1 if any pair is outside --tol. GGUF artifacts are skipped (llama.cpp is
their engine; the compiled engine reads safetensors checkpoints).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("recipe_name")
    ap.add_argument("--out", default="")
    ap.add_argument("--tol", type=float, default=0.005)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from quantkit.evaluation.engines import get_engine
    from quantkit.evaluation.kernels.weights import NotServed
    from quantkit.evaluation.perplexity import make_windows, perplexity
    from quantkit.store.store import Store

    engine = get_engine("torch-compiled")
    st = Store(args.store)
    tmp = Path(tempfile.mkdtemp(prefix="crosscheck-"))
    rows, bad = [], 0
    for m in sorted(st.list(), key=lambda m: m["target"]["name"]):
        if m.get("recipe", {}).get("name") != args.recipe_name:
            continue
        name = m["target"]["name"]
        if m.get("engine") == "llama.cpp":
            continue
        path = st.materialize(m["id"], tmp / m["id"]) if m["files"] else Path(m["entry"])
        tok_dir = path if (path / "tokenizer.json").exists() else Path(m["entry"])
        for ds, ref in sorted(m.get("metrics", {}).get("perplexity", {}).items()):
            row = {"target": name, "dataset": ds, "own_engine": ref.get("engine"), "own_ppl": ref["ppl"]}
            try:
                h = engine.load(path, ".", dtype=ref.get("dtype", "bfloat16"), compile=False)
            except (NotServed, OSError, ValueError) as e:
                row["skipped"] = f"{type(e).__name__}: {e}"[:160]
                rows.append(row)
                print(json.dumps(row), flush=True)
                break
            tok = AutoTokenizer.from_pretrained(tok_dir)
            windows = make_windows(ds, tok, ref["tokenizer"], ref["seq_len"], ref["max_windows"])
            assert windows.key == ref["key"], (name, ds, "not the windows the build scored")
            r = perplexity(engine, h, windows, batch_size=args.batch)
            ratio = r["ppl"] / ref["ppl"]
            row.update(compiled_ppl=round(r["ppl"], 4), ratio=round(ratio, 5), ok=abs(ratio - 1) <= args.tol,
                       windows=r["windows"], device=r["device"], dtype=r["dtype"], kernels=r["kernels"],
                       own_dtype=ref.get("dtype"), own_device=ref.get("device"))
            bad += not row["ok"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            del h
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("\n| target | dataset | own engine | own ppl | torch-compiled ppl | ratio |\n|---|---|---|---|---|---|")
    for r in rows:
        if "ratio" in r:
            print(f"| {r['target']} | {r['dataset']} | {r['own_engine']} | {r['own_ppl']:.3f} | "
                  f"{r['compiled_ppl']:.3f} | {r['ratio']:.4f} |")
        else:
            print(f"| {r['target']} | {r['dataset']} | {r['own_engine']} | {r['own_ppl']:.3f} | {r['skipped']} | - |")
    print(f"{bad} outside {args.tol:.1%}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
