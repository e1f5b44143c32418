"""Fit the build planner's constants (quantkit/data/build_costs.yaml) to a GPU run of scripts/bench_scale_gpu.py
and say how far the planner's predictions land from what was measured.

    python scripts/fit_build_costs.py RESULTS.json [--fit-shape 8b] [--logs DIR]

For each calibrated algorithm: time_factor from the fit shape's produce time (minus the planner's fixed and load
terms) over its counted per-layer work; act_bytes_per_token_width from its peak GPU memory minus the counted
layer weights, Hessians and CUDA context. Then every run (the other shape included) is predicted with the
fitted constants and compared: the other shape's error is the out-of-sample check (issue 10: within 25%).

AWQ (quantkit/build_plan.py, grid_search_seconds) is fitted from the fit shape's build log (--logs: the folder of
logs.tar.gz), per smoothing mapping: the mlp and down_proj grids give the FLOP factor, the attention's grid
beyond its FLOPs the bytes per softmax score, the calibrate/propagate bars the per-sample cost, and the produce
time what the grid's bookkeeping adds.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    from quantkit import build_plan
    from quantkit.planner import gpu_table
    from quantkit.sources.dummy import arch_config

    ap = argparse.ArgumentParser()
    ap.add_argument("results", type=Path)
    ap.add_argument("--fit-shape", default="8b")
    ap.add_argument("--logs", type=Path, help="the build logs (logs.tar.gz extracted): fits AWQ per mapping")
    a = ap.parse_args()
    results = json.loads(a.results.read_text())
    shapes = {"8b": "llama-3.1-8b", "70b": "llama-3.1-70b"}
    layers = {}
    for r in results:
        if r.get("job") == "materialize dummy" and r.get("dir"):
            layers[r["shape"]] = int(Path(r["dir"]).name.split("-L")[1].split("-")[0])
    costs = build_plan.costs()
    gpu = {**gpu_table()["H200-141GB"], "name": "H200-141GB"}
    profiles = {"gptq-w4-g128": ("layerwise", "gptq"), "awq-w4-g128": ("layerwise", "awq"),
                "int8-w8a8": ("layerwise", "smoothquant+gptq"), "fp8-static": ("layerwise", "observe"),
                "fp8-dynamic": ("model-free", "rtn"), "w4a16-rtn": ("model-free", "rtn")}
    samples, seq_len = 128, 2048
    fitted = {}
    runs = [r for r in results if r.get("job") in profiles and r.get("exit") == 0]
    for r in runs:
        if r["shape"] != a.fit_shape or profiles[r["job"]][0] != "layerwise":
            continue
        cfg, _ = arch_config(shapes[r["shape"]])
        arch = build_plan.Arch.from_config({**cfg, "num_hidden_layers": layers[r["shape"]]})
        alg = profiles[r["job"]][1]
        k = dict(costs["algorithms"][alg])
        one = dict(k, time_factor=1.0, act_bytes_per_token_width=0)
        costs_one = {**costs, "algorithms": {**costs["algorithms"], alg: one}}
        build_plan.costs = lambda c=costs_one: c  # noqa: E731 - evaluate the unit-factor work
        n = build_plan.plan_build(arch, [(r["job"], profiles[r["job"]])], samples=samples, seq_len=seq_len,
                                  gpu=gpu, gpus=1, host_ram=1e15)[0]
        fixed = costs["fixed_s"] + arch.params * 2 / (costs["load_gb_s"] * 1e9)
        work = n.minutes * 60 - fixed
        k["time_factor"] = round(max(0.05, (r["produce_s"] - fixed) / max(work, 1e-9)), 3)
        base_gpu = n.gpu_gb * 1e9
        k["act_bytes_per_token_width"] = round(max(0.0, (r["gpu_peak_allocated"] - base_gpu) /
                                                   (seq_len * (arch.hidden + arch.intermediate))), 2)
        if alg == "awq" and a.logs:
            log = (a.logs / f"{r['shape']}-{r['job']}.log").read_text(errors="replace")
            k = fit_awq(log, arch, samples, seq_len, gpu, r["produce_s"], fixed, dict(k))
        fitted[alg] = k
    new_costs = {**costs, "algorithms": {**costs["algorithms"], **fitted}}
    build_plan.costs = lambda: new_costs
    rows = []
    for r in runs:
        cfg, _ = arch_config(shapes[r["shape"]])
        arch = build_plan.Arch.from_config({**cfg, "num_hidden_layers": layers[r["shape"]]})
        n = build_plan.plan_build(arch, [(r["job"], profiles[r["job"]])], samples=samples, seq_len=seq_len, gpu=gpu,
                                  gpus=1, host_ram=1e15)[0]
        rows.append({"shape": r["shape"], "layers": layers[r["shape"]], "target": r["job"],
                     "measured_s": r["produce_s"], "predicted_s": round(n.minutes * 60, 1),
                     "time_err": round(n.minutes * 60 / r["produce_s"] - 1, 3),
                     "measured_gpu_gb": round(r.get("gpu_peak_allocated", 0) / 1e9, 2),
                     "predicted_gpu_gb": round(n.gpu_gb, 2),
                     "gpu_err": round(n.gpu_gb * 1e9 / r["gpu_peak_allocated"] - 1, 3) if r.get("gpu_peak_allocated") else None,
                     "measured_rss_gb": round(r["vmhwm"] / 1e9, 2), "predicted_host_gb": round(n.host_gb, 2)})
    print(json.dumps({"fitted": fitted, "checks": rows}, indent=1))
    return 0


GRID_PARENT = {"input_layernorm": "attn", "post_attention_layernorm": "mlp", "mlp.up_proj": "down"}
BAR = r"100%\|[^|\n]*\| (\d+)/\d+ \[[^,\n]*,\s*([\d.]+)(it/s|s/it)"


def bar_seconds(m: re.Match, first: int) -> float:
    n, rate, unit = int(m.group(first)), float(m.group(first + 1)), m.group(first + 2)
    return n / rate if unit == "it/s" else n * rate


def fit_awq(log: str, arch, samples: int, seq_len: int, gpu: dict, produce_s: float, fixed: float, k: dict) -> dict:
    """grid_search_seconds' constants from one AWQ build log (tqdm bars of llm-compressor 0.14)."""
    from quantkit.build_plan import grid_search_seconds

    text = log.replace("\r", "\n")
    grid: dict[str, list[float]] = {}
    points = 20
    for m in re.finditer(r"Grid search for model\.layers\.\d+\.([\w.]+): " + BAR, text):
        grid.setdefault(GRID_PARENT[m.group(1)], []).append(bar_seconds(m, 2))
        points = int(m.group(2))
    passes = {}
    for m in re.finditer(r"\((\d+)/\d+\): (Calibrating|Propagating): " + BAR, text):
        if int(m.group(1)) >= 2:  # decoder-layer subgraphs (the first holds only the embedding)
            passes.setdefault(m.group(2), []).append(bar_seconds(m, 3))
    g = {name: statistics.median(v) for name, v in grid.items()}
    pass_s = sum(statistics.median(v) for v in passes.values())
    tokens, bf16, bw = samples * seq_len, gpu["bf16_tflops"] * 1e12, gpu["bandwidth_gb_s"] * 1e9
    lin = arch.linears()
    attn, mlp, down = sum(i * o for i, o in lin[:4]), sum(i * o for i, o in lin[4:]), lin[6][0] * lin[6][1]
    attn_core = 4 * tokens * seq_len * arch.heads * arch.head_dim
    tf = (g["mlp"] + g["down"]) / (points * 2 * tokens * (mlp + down) / bf16)
    elems = samples * arch.heads * seq_len ** 2
    score_bytes = (g["attn"] - tf * points * (2 * tokens * attn + attn_core) / bf16) * bw / (points * elems)
    one_pass = tf * (2 * tokens * arch.layer_params + attn_core) / bf16 + elems * score_bytes / bw
    sample_s = max(0.0, pass_s - 2 * one_pass) / samples
    k.update(time_factor=round(tf, 3), score_bytes=round(score_bytes, 1), sample_s=round(sample_s, 4),
             grid_points=points, forward_passes=2, grid_overhead=0.0)
    grid_s = grid_search_seconds(arch, k, samples, seq_len, bf16, bw) - 2 * one_pass - samples * sample_s
    per_layer_measured = (produce_s - fixed) / arch.layers
    k["grid_overhead"] = round(max(0.0, (per_layer_measured - 2 * one_pass - samples * sample_s) / grid_s - 1), 3)
    return k


if __name__ == "__main__":
    sys.exit(main())
