"""The compiled engine on a GPU: Llama-3.1-8B shapes, random weights, every artifact layout it serves.

Writes artifacts in the real on-disk layouts from one random bf16 model (round-to-nearest on the GPU; the
quantization algorithm does not change a layout's speed): compressed-tensors float-/int-/pack-quantized with
the `quantization_config` llm-compressor writes (scripts/data/quant_configs.json), ModelOpt FP8 and W4A16_AWQ
with its `hf_quant_config.json`. Each artifact is then read back from its files by the `torch-compiled` engine,
checked against the same engine's reference path (dequantized weights, no compile) on one prompt, and timed:
prefill of --prompt tokens and decode of --gen tokens at each batch size. Appends one JSON line per run to
$OUT/results.jsonl and prints a table. `--layers` keeps the 8B layer shapes but fewer decoder layers (the
embedding and lm_head stay full size), so a run fits one 10-minute call.

  python scripts/bench_engine_gpu.py --layers 8 --out $OUT [--only bf16,fp8-dynamic] [--save-gemlite FILE]
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
    (dequantized weights, fp32 matmul), on the same random activations (16 tokens): worst relative error.
    (Whole-model logits are no check on a random model: its near-hard attention amplifies any rounding.)"""
    ref = engine.load(path, ".", kernels={k: "reference" for k in ("fp8", "int8", "int4")}, compile=False)
    mods = dict(ref.model.named_modules())
    worst, n = 0.0, 0
    g = torch.Generator(device=DEV).manual_seed(1)
    with torch.inference_mode():
        for name, m in h.model.named_modules():
            if getattr(m, "kernel", "reference") in ("reference", "cublas-bf16"):
                continue
            x = torch.randn(16, mods[name].in_features if hasattr(mods[name], "in_features") else
                            (mods[name].q.shape[1] if hasattr(mods[name], "q") else mods[name].weight.shape[1]),
                            generator=g, device=DEV).to(h.dtype)
            a, b = m(x).float(), mods[name](x).float()
            worst, n = max(worst, float((a - b).norm() / b.norm())), n + 1
    del ref, mods
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return {"linears": n, "max_rel_err": round(worst, 5)}


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
    ap.add_argument("--tiny", action="store_true", help="small dims (a CPU dry run of the script)")
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
    runs = [  # (label, artifact kind, kernels pinned or None = the engine's per-batch choice)
        ("bf16", "bf16", None), ("fp8-dynamic", "fp8-dynamic", None),
        ("fp8-dynamic rowwise", "fp8-dynamic", {"fp8": "scaled_mm-rowwise"}), ("fp8-static", "fp8-static", None),
        ("trtllm-fp8", "trtllm-fp8", None), ("int8-w8a8", "int8-w8a8", None),
        ("gptq-w4-g128 gemlite", "gptq-w4-sym", {"int4": "gemlite"}),
        ("gptq-w4-g128 tinygemm", "gptq-w4-sym", {"int4": "tinygemm"}),
        ("gptq-w4-g128-asym", "gptq-w4-asym", None), ("awq-w4-g128", "awq-w4", None),
        ("trtllm-int4-awq", "trtllm-int4-awq", None)]
    only = [s for s in args.only.split(",") if s]
    runs = [r for r in runs if not only or r[0] in only or r[1] in only]
    cfg = llama31_8b(args.layers)
    if args.tiny:
        cfg.update(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=64, vocab_size=1024)
    dense = random_dense(cfg)
    root = Path("/tmp/qkbench")
    spec = SimpleNamespace(prompt_len=args.prompt, gen_len=args.gen, repetitions=args.reps, warmup=1,
                           batch_sizes=[int(b) for b in args.batches.split(",")], threads=None)
    results = []
    for label, kind, kernels in runs:
        if time.perf_counter() - t_start > args.budget_s:
            print(f"{label}: skipped (time budget)", flush=True)
            continue
        t0 = time.perf_counter()
        rec = {"run": label, "artifact": kind, "layers": args.layers, "gpu": gpu, "bandwidth": bw}
        try:
            path = root / kind if (root / kind).exists() else build(kind, dense, cfg, root, args.group)
            rec["write_s"] = round(time.perf_counter() - t0, 1)
            wb = weight_bytes(path)
            t1 = time.perf_counter()
            h = engine.load(path, ".", kernels=kernels, compile=False)
            rec["load_s"] = round(time.perf_counter() - t1, 1)
            rec["check"] = check(engine, h, path)
            if DEV == "cuda":
                engine.compile(h)
            tp = engine.throughput(h, spec)
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
        if not any(kind == r[1] for r in runs[runs.index((label, kind, kernels)) + 1:]):
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
