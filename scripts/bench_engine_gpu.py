"""The compiled engine on a GPU: Llama-3.1-8B shapes, random weights, every artifact layout it serves.

Writes artifacts in the real on-disk layouts from one random bf16 model (round-to-nearest on the GPU; the
quantization algorithm does not change a layout's speed): compressed-tensors float-/int-/pack-quantized with
the `quantization_config` llm-compressor writes (scripts/data/quant_configs.json), ModelOpt FP8 and W4A16_AWQ
with its `hf_quant_config.json`. Each artifact is then read back from its files by the `torch-compiled` engine,
checked against the same engine's reference path (dequantized weights, no compile) on one prompt, and timed:
prefill of --prompt tokens and decode of --gen tokens at each batch size. Appends one JSON line per run to
$OUT/results.jsonl and prints a table. `--layers` keeps the 8B layer shapes but fewer decoder layers (the
embedding and lm_head stay full size). Variants pin kernels or turn the q/k/v and gate/up fusion off, at
batch 1 only, to show what each choice is worth; `--profile` adds where a batch-1 decode step's time goes.

  python scripts/bench_engine_gpu.py --layers 32 --out $OUT [--only bf16,fp8-dynamic] [--save-gemlite FILE]
      [--profile bf16,fp8-static] [--keep-dense DIR]
  python scripts/bench_engine_gpu.py --tiny --layers 2 --prompt 32 --gen 4 --batches 1,2   # CPU dry run
The kernel table is quantkit/evaluation/kernels/data/choices.json, or the file $QUANTKIT_KERNEL_CHOICES names
(e.g. the one scripts/bench_decode_attention.py writes from its measurements).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: only for a dry run of the script (--tiny)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
TEMPLATES = json.loads((Path(__file__).parent / "data" / "quant_configs.json").read_text())
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama31_8b(layers: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "num_hidden_layers": layers, "vocab_size": 128256, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0, "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000,
            "eos_token_id": 128001}


def random_dense(cfg: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=DEV).manual_seed(0)
    h, inter, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
              "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    rnd = lambda *s: (torch.randn(*s, generator=g, device=DEV) * 0.02).bfloat16()  # noqa: E731
    sd = {"model.embed_tokens.weight": rnd(cfg["vocab_size"], h), "lm_head.weight": rnd(cfg["vocab_size"], h),
          "model.norm.weight": torch.ones(h, device=DEV, dtype=torch.bfloat16)}
    for i in range(cfg["num_hidden_layers"]):
        for n in ("input_layernorm", "post_attention_layernorm"):
            sd[f"model.layers.{i}.{n}.weight"] = torch.ones(h, device=DEV, dtype=torch.bfloat16)
        for leaf, shape in shapes.items():
            sub = "self_attn" if leaf in LINEAR[:4] else "mlp"
            sd[f"model.layers.{i}.{sub}.{leaf}.weight"] = rnd(*shape)
    return sd


def save(out: Path, cfg: dict, tensors: dict, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for name, obj in (extra or {}).items():
        (out / name).write_text(json.dumps(obj, indent=1))
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(out / "model.safetensors"))
    return out


def is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.rsplit(".", 2)[-2] in LINEAR


def w4_groups(w: torch.Tensor, group: int, sym: bool):
    """RTN int4 per group along the input: (q uint8 in [0,15], scale (N, ng), zero (N, ng) ints)."""
    n, k = w.shape
    x = w.float().view(n, k // group, group)
    if sym:
        scale = (x.abs().amax(-1) / 7.5).clamp(min=1e-8)
        zero = torch.full_like(scale, 8.0)
    else:
        lo, hi = x.amin(-1), x.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zero = (-lo / scale).round().clamp(0, 15)
    q = (x / scale[..., None] + zero[..., None]).round().clamp(0, 15).to(torch.uint8).view(n, k)
    return q, scale, zero


def build(kind: str, dense: dict, cfg: dict, root: Path, group: int) -> Path:
    """One artifact of `kind` in its on-disk layout (see module docstring)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    if kind == "bf16":
        return save(root / kind, cfg, dense)
    t = TEMPLATES[{"gptq-w4-sym": "w4-sym", "gptq-w4-asym": "w4-asym", "awq-w4": "w4-asym"}.get(kind, kind)]
    qc = json.loads(json.dumps(t["quantization_config"]))
    for grp in qc.get("config_groups", {}).values():
        if grp.get("weights", {}).get("group_size"):
            grp["weights"]["group_size"] = group
    out = {}
    for name, w in dense.items():
        if not is_linear(name):
            out[name] = w
            continue
        mod = name[: -len(".weight")]
        if kind in ("fp8-dynamic", "fp8-static", "trtllm-fp8"):
            per_row = kind == "fp8-dynamic"
            s = (w.float().abs().amax(-1, keepdim=True) if per_row else w.float().abs().amax()) / 448.0
            out[name] = (w.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn)
            modelopt = kind.startswith("trtllm")
            out[f"{mod}.weight_scale"] = s if per_row else (s.reshape(()) if modelopt else s.reshape(1))
            if not per_row:  # a static activation scale, as calibration would give for activations of ~N(0, 1)
                a = torch.tensor(4.0 / 448.0, device=DEV)
                out[f"{mod}.input_scale"] = a.reshape(()) if modelopt else a.reshape(1)
        elif kind == "int8-w8a8":
            s = w.float().abs().amax(-1, keepdim=True) / 127.0
            out[name] = (w.float() / s).round().clamp(-128, 127).to(torch.int8)
            out[f"{mod}.weight_scale"] = s
        elif kind in ("gptq-w4-sym", "gptq-w4-asym", "awq-w4"):
            q, s, z = w4_groups(w, group, sym=kind == "gptq-w4-sym")
            out[f"{mod}.weight_packed"] = pack_to_int32((q.int() - 8).to(torch.int8), 4)
            out[f"{mod}.weight_scale"] = s.bfloat16()
            out[f"{mod}.weight_shape"] = torch.tensor(list(w.shape), dtype=torch.int64)
            if kind != "gptq-w4-sym":
                out[f"{mod}.weight_zero_point"] = pack_to_int32((z.int() - 8).to(torch.int8), 4, packed_dim=0)
        elif kind == "trtllm-int4-awq":
            q, s, _ = w4_groups(w, group, sym=True)
            signed = (q.int() - 8).clamp(-8, 7)  # ModelOpt: signed int4, byte i holds rows 2i (low) and 2i+1
            low, high = signed[0::2] & 0xF, signed[1::2] & 0xF
            out[name] = (low | (high << 4)).to(torch.uint8)
            out[f"{mod}.weight_scale"] = s.bfloat16()
            if mod.endswith(("o_proj", "down_proj")):  # q/k/v and gate/up have theirs folded into the norms
                out[f"{mod}.pre_quant_scale"] = torch.ones(w.shape[1], device=DEV, dtype=torch.bfloat16)
    extra = {"hf_quant_config.json": t["hf_quant_config"]} if "hf_quant_config" in t else None
    if extra:
        extra["hf_quant_config.json"]["quantization"]["group_size"] = group if "int4" in kind else None
    return save(root / kind, {**cfg, "quantization_config": qc}, out, extra)


def check(engine, h, path: Path) -> dict:
    """Every kernel-backed linear of handle h against the same linear on the engine's reference path
    (dequantized weights, fp32 matmul), on the same random activations (1, 16, 2048 tokens): worst relative error.
    (Whole-model logits are no check on a random model: its near-hard attention amplifies any rounding.)"""
    ref = engine.load(path, ".", kernels={**{k: "reference" for k in ("fp8", "int8", "int4")},
                                          "fuse": h.kernels.get("fuse", [])}, compile=False)
    mods = dict(ref.model.named_modules())
    worst, n = 0.0, 0
    g = torch.Generator(device=DEV).manual_seed(1)
    with torch.inference_mode():
        for name, m in h.model.named_modules():
            if getattr(m, "kernel", "reference") in ("reference", "cublas-bf16"):
                continue
            k = mods[name].q.shape[1] if hasattr(mods[name], "q") else mods[name].weight.shape[1]
            for rows in (1, 16, 2048):  # int4 modules pick a kernel per call by rows: check each
                x = torch.randn(rows, k, generator=g, device=DEV).to(h.dtype)
                a, b = m(x).float(), mods[name](x).float()
                worst = max(worst, float((a - b).norm() / b.norm()))
            n += 1
    del ref, mods
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return {"linears": n, "max_rel_err": round(worst, 5)}


def keep_dense(src: Path, dest: Path, tokenizer: Path) -> None:
    """The bf16 checkpoint with a tokenizer (the demo model's: the 8B one is not available offline; the
    converter pads the vocabulary to the model's 128256 rows) for llama.cpp's converter; `.ready` last."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(dest))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / f, dest / f)
    (dest / ".ready").write_text("ok\n")


def profile_decode(h, prompt: int, bytes_per_token: int, gb_s: float, steps: int = 20) -> dict:
    """Where a batch-1 decode step's time goes: the same step (compiled layers) run without the graph under the
    profiler gives every kernel's device time; the graph replay's time per step (CUDA events) minus their sum
    is the time with no kernel running (launch gaps inside the graph)."""
    from torch.profiler import ProfilerActivity, profile

    from quantkit.evaluation.engines.torch_compiled import _decode_graph

    h.model.setup_cache(1, prompt + steps + 8, h.dtype, h.device)
    with torch.inference_mode():
        tok, pos, replay = _decode_graph(h, 1, prompt)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        for _ in range(3):
            replay()
        pos.fill_(prompt)
        ev[0].record()
        for _ in range(steps):
            replay()
        ev[1].record()
        torch.cuda.synchronize()
        graph_us = ev[0].elapsed_time(ev[1]) * 1000 / steps
        pos.fill_(prompt)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):  # the step _decode_graph captures, launched kernel by kernel
                tok.copy_(h.model(tok, pos, last_only=True)[:, -1].argmax(-1, keepdim=True))
                pos.add_(1)
            torch.cuda.synchronize()
    kern = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t and e.count:
            kern[e.key] = (t / steps, e.count / steps)
    total = sum(t for t, _ in kern.values())
    top = sorted(kern.items(), key=lambda kv: -kv[1][0])[:15]
    h.model.drop_cache()
    return {"step_us": round(graph_us, 1), "kernel_us": round(total, 1), "idle_us": round(graph_us - total, 1),
            "bound_us": round(bytes_per_token / gb_s / 1e3, 1), "kernels_per_step": round(sum(c for _, c in kern.values())),
            "top": [{"name": k[:90], "us": round(t, 1), "n": round(c, 1)} for k, (t, c) in top]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    ap.add_argument("--only", default="")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--budget-s", type=float, default=480)
    ap.add_argument("--save-gemlite", default="")
    ap.add_argument("--root", default="/tmp/qkbench", help="where the artifacts are written (one at a time)")
    ap.add_argument("--profile", default="", help="runs (labels) whose batch-1 decode step is profiled")
    ap.add_argument("--keep-dense", default="", help="move the bf16 checkpoint here (with --tokenizer's files) "
                    "for the GGUF conversion")
    ap.add_argument("--tokenizer", default="models/smollm2-135m-instruct")
    ap.add_argument("--tiny", action="store_true", help="small dims (a CPU dry run of the script)")
    ap.add_argument("--no-check", action="store_true", help="skip the per-linear check against the reference "
                    "path (a timing-only re-run of kernels already checked)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    from quantkit.evaluation.engines import get_engine
    from quantkit.evaluation.kernels.choices import load_gemlite_config
    from quantkit.evaluation.roofline import decode_bound, memory_bandwidth, weight_bytes

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engine = get_engine("torch-compiled")
    gpu = torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu"
    bw = memory_bandwidth()
    print(f"{gpu}; torch {torch.__version__}; bandwidth {bw['gb_per_s']} GB/s; gemlite config "
          f"{load_gemlite_config() if DEV == 'cuda' else None}", flush=True)
    b_all = [int(b) for b in args.batches.split(",")]
    unfused = {"fuse": []}
    runs = [  # (label, artifact kind, kernels over the engine's per-batch choice or None, batch sizes or None = all)
        ("bf16", "bf16", None, None), ("bf16 unfused", "bf16", unfused, [1]),
        ("fp8-static", "fp8-static", None, None), ("fp8-static unfused", "fp8-static", unfused, [1]),
        ("trtllm-fp8", "trtllm-fp8", None, None), ("fp8-dynamic", "fp8-dynamic", None, None),
        ("gptq-w4-g128", "gptq-w4-sym", None, None),
        ("gptq-w4-g128 tinygemm unfused", "gptq-w4-sym", {"int4": "tinygemm", "fuse": []}, [1]),
        ("gptq-w4-g128 gemlite", "gptq-w4-sym", {"int4": "gemlite"}, [1]),
        ("gptq-w4-g128-asym", "gptq-w4-asym", None, None), ("awq-w4-g128", "awq-w4", None, None),
        ("trtllm-int4-awq", "trtllm-int4-awq", None, None), ("int8-w8a8", "int8-w8a8", None, None),
        ("fp8-dynamic rowwise", "fp8-dynamic", {"fp8": "scaled_mm-rowwise"}, [1])]
    only = [s for s in args.only.split(",") if s]
    runs = [r for r in runs if not only or r[0] in only or r[1] in only]
    if only:  # in the order asked
        runs.sort(key=lambda r: min(only.index(x) for x in (r[0], r[1]) if x in only))
    cfg = llama31_8b(args.layers)
    if args.tiny:
        cfg.update(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=64, vocab_size=49152)  # the demo tokenizer's size (the GGUF lane's converter)
    dense = random_dense(cfg)
    root = Path(args.root)
    results = []
    for i, (label, kind, kernels, batches) in enumerate(runs):
        spec = SimpleNamespace(prompt_len=args.prompt, gen_len=args.gen, repetitions=args.reps, warmup=1,
                               batch_sizes=batches or b_all, threads=None)
        if time.perf_counter() - t_start > args.budget_s:
            print(f"{label}: skipped (time budget)", flush=True)
            continue
        t0 = time.perf_counter()
        rec = {"run": label, "artifact": kind, "layers": args.layers, "gpu": gpu, "bandwidth": bw,
               "gpu_index": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
        try:
            path = root / kind if (root / kind).exists() else build(kind, dense, cfg, root, args.group)
            rec["write_s"] = round(time.perf_counter() - t0, 1)
            wb = weight_bytes(path)
            t1 = time.perf_counter()
            h = engine.load(path, ".", kernels=kernels, compile=False)
            rec["load_s"] = round(time.perf_counter() - t1, 1)
            rec["check"] = check(engine, h, path) if kind != "bf16" and not args.no_check else {"linears": 0}
            if DEV == "cuda":
                engine.compile(h)
            tp = engine.throughput(h, spec)
            if label in args.profile.split(",") and DEV == "cuda":
                rec["profile_b1"] = profile_decode(h, args.prompt, wb["bytes_per_token"], bw["gb_per_s"])
            del h
            rec.update(tp=tp, bytes_per_token=wb["bytes_per_token"], decode_bound_tok_s=round(decode_bound(wb, bw), 1))
        except Exception as e:  # one broken layout must not cost the other measurements
            rec["error"] = f"{type(e).__name__}: {e}"[:500]
        rec["wall_s"] = round(time.perf_counter() - t0, 1)
        if DEV == "cuda":
            torch.cuda.empty_cache()
        results.append(rec)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps({k: rec.get(k) for k in ("run", "wall_s", "check", "error")}), flush=True)
        if args.save_gemlite and DEV == "cuda":
            import gemlite

            gemlite.cache_config(args.save_gemlite)
        if not any(kind == r[1] for r in runs[i + 1:]):  # the last run of this artifact
            if kind == "bf16" and args.keep_dense and not Path(args.keep_dense, "config.json").exists():
                keep_dense(root / kind, Path(args.keep_dense), Path(args.tokenizer))
            shutil.rmtree(root / kind, ignore_errors=True)
    table(results)


def table(results: list[dict]) -> None:
    base = next((r for r in results if r["run"] == "bf16" and "tp" in r), None)
    print("\n| run | prefill tok/s (b=1) | decode b=1 | b=16 | b=64 | x bf16 b1/b16/b64 | % of bound b1 | kernels |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "tp" not in r:
            print(f"| {r['run']} | error: {r.get('error', '')[:120]} |")
            continue
        bt = r["tp"]["batches"]
        dec = [bt.get(b, {}).get("decode_tok_s") for b in ("1", "16", "64")]
        ref = [base["tp"]["batches"].get(b, {}).get("decode_tok_s") for b in ("1", "16", "64")] if base else [None] * 3
        x = "/".join("-" if not (d and f) else f"{d / f:.2f}" for d, f in zip(dec, ref))
        pct = 100 * dec[0] / r["decode_bound_tok_s"] if dec[0] else math.nan
        ks = ";".join(f"{k}={'/'.join(v)}" for k, v in r["tp"]["kernels"].items())
        print(f"| {r['run']} | {bt.get('1', {}).get('prefill_tok_s', '-')} | " + " | ".join(str(d) for d in dec)
              + f" | {x} | {pct:.0f}% | {ks} |")


if __name__ == "__main__":
    main()
