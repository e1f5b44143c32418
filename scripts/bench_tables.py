"""Markdown tables from the H200 run's raw files (docs/benchmarks/h200/README.md is written from them):

  python scripts/bench_tables.py DIR

DIR holds bench-results.jsonl (scripts/bench_engine_gpu.py, one line per run; lanes on two GPUs each carry
their own bf16 baseline, and a run is divided only by the baseline of its own GPU: the `lane` field, or the
order of the lines) and optionally gguf8b/bench-*.json + batched-*.jsonl (scripts/gguf_bench_gpu.sh).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def engine_table(lines: list[dict]) -> str:
    out = ["| GPU | run | kernels (b=1 decode) | fused | weight GB/token | decode b=1 | b=16 | b=64 | % of bound b=1 | "
           "prefill 2048 b=1 | b=16 | b=64 | check (max rel. err.) |", "|---|" * 1 + "---|" * 12]
    base = None
    for r in lines:
        if r["run"] == "bf16" and "tp" in r:
            base = r
        if "tp" not in r:
            out.append(f"| {r.get('gpu_index', '?')} | {r['run']} | error: {r.get('error', '')[:100]} |")
            continue
        bt, ref = r["tp"]["batches"], (base or r)["tp"]["batches"]

        def cell(b, key):
            v = bt.get(b, {}).get(key)
            if v is None:
                return "-"
            f = ref.get(b, {}).get(key)
            x = f" ({v / f:.2f}x)" if f and r is not base else ""
            return f"{v / 1000:.1f}k{x}" if key == "prefill_tok_s" else f"{v:.0f}{x}"

        k = r["tp"]["kernels"]
        kern = "; ".join(f"{n}: {'/'.join(v)}" for n, v in k.items() if n != "fused")
        pct = 100 * bt["1"]["decode_tok_s"] / r["decode_bound_tok_s"] if "1" in bt else None
        chk = r.get("check", {})
        out.append(f"| {r.get('gpu_index', '?')} | {r['run']} | {kern} | {'yes' if k.get('fused') else 'no'} | "
                   f"{r['bytes_per_token'] / 1e9:.2f} | {cell('1', 'decode_tok_s')} | {cell('16', 'decode_tok_s')} | "
                   f"{cell('64', 'decode_tok_s')} | {pct:.0f}% | {cell('1', 'prefill_tok_s')} | "
                   f"{cell('16', 'prefill_tok_s')} | {cell('64', 'prefill_tok_s')} | "
                   f"{chk.get('max_rel_err', '-')} ({chk.get('linears', 0)}) |")
    return "\n".join(out)


def profile_table(lines: list[dict]) -> str:
    out = ["| run | step µs (graph) | bound µs | kernel µs | idle µs | kernels/step | top kernels (µs/step) |",
           "|---|---|---|---|---|---|---|"]
    for r in lines:
        p = r.get("profile_b1")
        if not p:
            continue
        top = "; ".join(f"{t['name'][:48]} {t['us']:.0f} (x{t['n']:.0f})" for t in p["top"][:5])
        out.append(f"| {r['run']} | {p['step_us']:.0f} | {p['bound_us']:.0f} | {p['kernel_us']:.0f} | "
                   f"{p['idle_us']:.0f} | {p['kernels_per_step']} | {top} |")
    return "\n".join(out)


def gguf_table(d: Path) -> str:
    out = ["| GGUF | size GB | llama-bench pp2048 tok/s | tg128 tok/s | batched decode b=1 | b=16 | b=64 | "
           "batched prefill b=1 |", "|---|---|---|---|---|---|---|---|"]
    base = {}
    for q in ("F16", "Q8_0", "Q4_K_M"):
        f = d / f"bench-{q}.json"
        if not f.exists():
            continue
        rows = json.loads(f.read_text() or "[]")
        pp = next((r for r in rows if r["n_prompt"] > 0), None)
        tg = next((r for r in rows if r["n_gen"] > 0), None)
        bb = {}
        bf = d / f"batched-{q}.jsonl"
        if bf.exists():
            for line in bf.read_text().splitlines():
                if line.startswith("{"):
                    j = json.loads(line)
                    bb[j.get("pl")] = j
        if q == "F16":
            base = {"tg": tg and tg["avg_ts"], **{b: v.get("speed_tg") for b, v in bb.items()}}

        def x(v, ref):
            return f"{v:.0f}" + (f" ({v / ref:.2f}x)" if ref and q != "F16" else "") if v else "-"

        size = (pp or tg or {}).get("model_size", 0) / 1e9
        out.append(f"| {q} | {size:.2f} | {pp['avg_ts']:.0f} | {x(tg and tg['avg_ts'], base.get('tg'))} | "
                   + " | ".join(x(bb.get(b, {}).get("speed_tg"), base.get(b)) for b in (1, 16, 64))
                   + f" | {bb.get(1, {}).get('speed_pp', 0):.0f} |")
    return "\n".join(out)


def main() -> None:
    d = Path(sys.argv[1])
    lines = [json.loads(x) for x in (d / "bench-results.jsonl").read_text().splitlines() if x.strip()]
    print(engine_table(lines), "\n")
    print(profile_table(lines), "\n")
    if (d / "gguf8b").exists():
        print(gguf_table(d / "gguf8b"))


if __name__ == "__main__":
    main()
