"""AWQ GEMM checkpoints (AutoAWQ ``WQLinear_GEMM``, version "gemm"), research/anchors.md §7.2.

Per quantized Linear (4-bit only, asymmetric, contiguous groups):
- ``qweight`` int32 [in, out/8]: nibble i (bits 4i..4i+3) of word [k, c] holds q[8c + AWQ_ORDER[i], k]
  (q indexed (out, in)), AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7].
- ``qzeros``  int32 [ngroups, out/8]: same interleave, the plain zero point (no -1 offset).
- ``scales``  fp16  [ngroups, out].  No g_idx: AWQ has no act-order, so g = i // group_size.
Dequantize: W[o, i] = (q[o, i] - z[o, i // G]) * s[o, i // G].

Choices recorded here:
- Scales are stored fp16 (the format has no other dtype); an fp32/bf16 compressed-tensors scale changes
  value. Integers and zero points are copied exactly; ``write_awq_gemm`` reports max |dW| vs the original.
- Non-quantized tensors are cast to fp16 (``other_dtype``), as AutoAWQ checkpoints are.
- Activation-aware scales from llm-compressor's AWQModifier are already folded into the weights and
  norms, so nothing extra is stored (same as AutoAWQ).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from quantkit.formats.layouts.compressed_tensors import (
    CTLayer,
    check_fp16_scale,
    quantization_config,
    rewrite_checkpoint,
    scale_cast_error,
    shard_files,
    write_config,
)

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of a word holds column AWQ_ORDER[i] of its 8-column block
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # column c sits in nibble AWQ_REVERSE_ORDER[c]


def pack_awq(values_rows_cols: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values (R, C) -> int32 (R, C/8), packed along dim 1 with the AWQ interleave."""
    rows, cols = values_rows_cols.shape
    if cols % 8:
        raise ValueError(f"AWQ packs 8 columns per int32; {cols} is not a multiple of 8")
    v = values_rows_cols.to(torch.int64).reshape(rows, cols // 8, 8)
    words = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for i, col in enumerate(AWQ_ORDER):
        words |= v[:, :, col] << (4 * i)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _awq_layer(layer: CTLayer, group_size: int, stats: dict) -> dict[str, torch.Tensor]:
    _require_awq_compatible(layer.name, layer.bits, layer.symmetric, layer.group_size)
    if layer.group_size != group_size:
        raise ValueError(f"{layer.name}: group_size {layer.group_size} differs from the config's {group_size}")
    if not layer.has_trivial_g_idx():
        raise ValueError(f"{layer.name}: has an act-order g_idx; AWQ GEMM has no g_idx (use GPTQ v1)")
    out_f, in_f = layer.shape
    if in_f % group_size or out_f % 8:
        raise ValueError(f"{layer.name}: shape {layer.shape} needs in % {group_size} == 0 and out % 8 == 0")
    s16 = check_fp16_scale(layer)
    stats["max_abs_dw_vs_original_scale"] = max(stats["max_abs_dw_vs_original_scale"], scale_cast_error(layer, s16))
    return {
        "qweight": pack_awq(layer.q.t()),  # (in, out) -> [in, out/8]
        "qzeros": pack_awq(layer.zero.t()),  # (ng, out) -> [ng, out/8]
        "scales": s16.t().contiguous(),
    }


def _require_awq_compatible(where: str, bits: int, symmetric: bool, group_size: int | None) -> None:
    if bits != 4:
        raise ValueError(f"{where}: AWQ GEMM is 4-bit only, got {bits}-bit")
    if symmetric:
        raise ValueError(f"{where}: AWQ GEMM (zero_point=true) needs an asymmetric scheme, got symmetric")
    if group_size is None or group_size <= 0:
        raise ValueError(f"{where}: AWQ GEMM needs group quantization, got channel/per-tensor")


def _modules_to_not_convert(ignore: list[str] | None, names: list[str], other_keys: list[str]) -> list[str] | None:
    """CT ``ignore`` as AWQ's substring list: plain names kept, regexes expanded to concrete modules."""
    if not ignore:
        return None
    out = []
    candidates = sorted({k.rsplit(".", 1)[0] for k in other_keys if k.endswith(".weight")} - set(names))
    for pat in ignore:
        if pat.startswith("re:"):
            out += [m for m in candidates if re.match(pat[3:], m)]
        elif pat != "Linear":
            out.append(pat)
    return sorted(set(out)) or None


def write_awq_gemm(ct_dir: str | Path, out_dir: str | Path, *, other_dtype: torch.dtype = torch.float16) -> dict:
    """Convert a compressed-tensors int4 asymmetric group checkpoint into an AutoAWQ GEMM checkpoint."""
    ct_dir, out_dir = Path(ct_dir), Path(out_dir)
    qc = quantization_config(ct_dir)
    groups = [g.get("weights") or {} for g in qc.get("config_groups", {}).values()]
    if len({json.dumps(w, sort_keys=True) for w in groups}) != 1:
        raise ValueError(f"{ct_dir}: AWQ GEMM needs one weight scheme for all layers")
    w = groups[0]
    gs = int(w["group_size"]) if w.get("strategy") == "group" else None
    _require_awq_compatible(str(ct_dir), int(w.get("num_bits", 0)), bool(w.get("symmetric", True)), gs)
    if w.get("actorder") not in (None, "weight", "static"):  # weight/static reorder only during calibration
        raise ValueError(f"{ct_dir}: actorder={w.get('actorder')!r} produces a g_idx; AWQ GEMM has none")
    stats = {"max_abs_dw_vs_original_scale": 0.0}
    _, names = rewrite_checkpoint(ct_dir, out_dir, lambda l: _awq_layer(l, gs, stats), other_dtype)
    other_keys = []
    for path in shard_files(out_dir):
        with safe_open(str(path), framework="pt") as f:
            other_keys += list(f.keys())
    qcfg = {
        "quant_method": "awq",
        "zero_point": True,
        "group_size": gs,
        "bits": 4,
        "version": "gemm",
        "modules_to_not_convert": _modules_to_not_convert(qc.get("ignore"), names, other_keys),
    }
    write_config(ct_dir, out_dir, qcfg, other_dtype)
    return {"out_dir": str(out_dir), "layers": names, "quantization_config": qcfg, **stats}


# ---- reader: written from the format description above, not from the writer's helpers ----

def read_awq_gemm(model_dir: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """Unpack every WQLinear_GEMM of a checkpoint. Returns {module: {q (out,in) int16, zero (out,ng)
    int16, scale (out,ng) fp16, g_idx (in,) int32, weight (out,in) fp16}}."""
    model_dir = Path(model_dir)
    qc = json.loads((model_dir / "config.json").read_text())["quantization_config"]
    if qc.get("quant_method") != "awq" or str(qc.get("version", "")).lower() != "gemm" or qc.get("bits", 4) != 4:
        raise ValueError(f"{model_dir}: not an AWQ GEMM 4-bit checkpoint: {qc}")
    gs = int(qc["group_size"])
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    reverse = torch.tensor(AWQ_REVERSE_ORDER)

    def unpack(words: torch.Tensor) -> torch.Tensor:
        # (R, C/8) -> nibbles (R, C/8, 8) in storage order -> columns in natural order -> (R, C)
        nib = (words.unsqueeze(-1) >> shifts) & 0xF
        return nib[:, :, reverse].reshape(words.shape[0], -1).to(torch.int16)

    raw: dict[str, dict[str, torch.Tensor]] = {}
    for path in shard_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                mod, _, suffix = k.rpartition(".")
                if suffix in ("qweight", "qzeros", "scales"):
                    raw.setdefault(mod, {})[suffix] = f.get_tensor(k)
    layers = {}
    for mod, t in raw.items():
        assert t["qweight"].dtype == torch.int32 and t["qzeros"].dtype == torch.int32
        assert t["scales"].dtype == torch.float16
        iw, iz, scales = unpack(t["qweight"]), unpack(t["qzeros"]), t["scales"]  # [in,out], [ng,out], [ng,out]
        g_idx = torch.arange(iw.shape[0]) // gs
        w = (iw - iz[g_idx]) * scales[g_idx]  # [in, out], fp16 with one rounding
        layers[mod] = {"q": iw.t(), "zero": iz.t(), "scale": scales.t(), "g_idx": g_idx.to(torch.int32), "weight": w.t()}
    return layers
