"""Unquantized tensors are written in the checkpoint's own dtype (or the recipe's explicit `model.dtype`),
whatever the host computed in.

A CPU build computes in fp32 (no fast 16-bit matmul there), and the libraries save the model as it is in memory:
an FP8 artifact of a bf16 model then carries fp32 embeddings, norms and lm_head, and comes out larger than its
source on a large-vocabulary model. This pass runs after a format's save (llm-compressor's compressed-tensors
and ModelOpt's unified export alike): every float tensor that is not part of a quantized module is cast to the
storage dtype, shard by shard, and config.json says that dtype. Quantized modules are left as their format
wrote them (their weights are fp8/int; their scales keep the dtype the library gave them, which its loaders
expect), except ModelOpt's `pre_quant_scale`, which TensorRT-LLM reads in the model dtype (W4A8 asserts it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

FLOAT_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# leaf names that make their module a quantized one (compressed-tensors, ModelOpt, GPTQ v1 / AWQ GEMM layouts)
QUANT_SUFFIXES = ("_scale", "_scale_2", "_zero_point", "_g_idx", "_shape", "_packed", "_global_scale")
QUANT_LEAVES = {"qweight", "qzeros", "scales", "g_idx"}
MODEL_DTYPE_LEAVES = {"pre_quant_scale"}  # activation-side scales the consumer reads in the model dtype


def _header(f: Path) -> dict[str, dict]:
    """tensor name -> {dtype, shape, data_offsets}, from the safetensors header only."""
    with open(f, "rb") as fh:
        head = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    head.pop("__metadata__", None)
    return head


def source_dtype(source_dir: Path) -> str:
    """A checkpoint's own dtype: the float dtype holding most of its weight bytes (config.json can disagree
    with the files; the files are what a user downloads)."""
    total: dict[str, int] = {}
    for f in sorted(source_dir.glob("*.safetensors")):
        for v in _header(f).values():
            if v["dtype"] in FLOAT_NAMES:
                total[v["dtype"]] = total.get(v["dtype"], 0) + v["data_offsets"][1] - v["data_offsets"][0]
    if not total:
        cfg = json.loads((source_dir / "config.json").read_text())
        return str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    return FLOAT_NAMES[max(total, key=total.__getitem__)]


def storage_dtype(ctx) -> str:
    """The recipe's explicit dtype, else the source checkpoint's own."""
    explicit = ctx.recipe.model.dtype
    return explicit if explicit != "auto" else source_dtype(ctx.source.path)


def _quantized_modules(names: set[str]) -> set[str]:
    out = set()
    for n in names:
        mod, _, leaf = n.rpartition(".")
        if leaf in QUANT_LEAVES or (leaf.endswith(QUANT_SUFFIXES) and leaf not in MODEL_DTYPE_LEAVES):
            out.add(mod)
    return out


def write_unquantized_in(out_dir: Path, dtype: str) -> dict:
    """Cast the unquantized float tensors of every safetensors checkpoint under out_dir to `dtype` (in place,
    one shard at a time, each replaced atomically); returns what it did, for the manifest."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    target = getattr(torch, dtype)
    cast = 0
    for cfg_path in sorted(out_dir.rglob("config.json")):
        ckpt = cfg_path.parent
        shards = sorted(ckpt.glob("*.safetensors"))
        if not shards:
            continue
        headers = {f: {n: v["dtype"] for n, v in _header(f).items()} for f in shards}
        quantized = _quantized_modules({n for h in headers.values() for n in h})

        def wants_cast(name: str, code: str) -> bool:
            mod, _, leaf = name.rpartition(".")
            return (code in FLOAT_NAMES and FLOAT_NAMES[code] != dtype
                    and (mod not in quantized or leaf in MODEL_DTYPE_LEAVES))

        for f, head in headers.items():
            todo = {n for n, code in head.items() if wants_cast(n, code)}
            if not todo:
                continue
            with safe_open(f, framework="pt") as sf:
                meta = sf.metadata()
                tensors = {n: (sf.get_tensor(n).to(target) if n in todo else sf.get_tensor(n)) for n in sf.keys()}
            tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
            save_file(tensors, tmp, metadata=meta)
            del tensors
            tmp.replace(f)
            cast += len(todo)
        cfg = json.loads(cfg_path.read_text())
        for k in ("dtype", "torch_dtype"):
            if k in cfg or k == "dtype":
                cfg[k] = dtype
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return {"storage_dtype": dtype, "tensors_cast": cast}
