"""GPTQ "v1" checkpoints (AutoGPTQ ``qlinear_cuda_old`` / GPTQModel ``FORMAT.GPTQ``), research/anchors.md §7.1.

Per quantized Linear (pf = 32 // bits, b in {2, 4, 8}):
- ``qweight`` int32 [in/pf, out]: word [r, o] holds q[o, r*pf + j] in bits [b*j, b*j+b), j=0 lowest.
- ``qzeros``  int32 [ngroups, out/pf]: word [g, c] holds (z[c*pf + j, g] - 1) in the same bit order ("v1").
- ``scales``  fp16  [ngroups, out];  ``g_idx`` int32 [in] (i // group_size unless act-order).
Dequantize: W[o, i] = scales[g_idx[i], o] * (q[o, i] - (stored_zero[g_idx[i], o] + 1)).

Choices recorded here:
- Scales are stored fp16 as every v1 consumer expects. An fp32/bf16 compressed-tensors scale therefore
  changes value; the integers and zero points are copied exactly, the dequantized weight is bit-exact
  relative to the fp16-cast scale, and ``write_gptq_v1`` reports the max |dW| versus the original scale.
- Non-quantized tensors (embeddings, norms, lm_head, biases) are cast to fp16 like AutoGPTQ checkpoints
  (``other_dtype``); config.json gets ``torch_dtype``/``dtype`` float16.
- A zero point of 0 stores -1, which wraps to 2^b-1 in v1 and mainstream readers decode as 2^b (they add 1
  after masking); that is v1's known asymmetric defect, so the writer refuses it unless
  ``allow_zero_underflow=True`` (then the wrapped nibble is written and counted).
"""
from __future__ import annotations

import json
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

GPTQ_BITS = (2, 4, 8)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 -> int32 with the same bits (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned values (R, C) along dim 0: word [r, c] = sum_j values[r*pf + j, c] << (bits*j)."""
    pf = 32 // bits
    rows, cols = values.shape
    if rows % pf:
        raise ValueError(f"cannot pack {rows} rows into int32 words of {pf} x {bits}-bit")
    v = values.to(torch.int64).reshape(rows // pf, pf, cols)
    shifts = (torch.arange(pf, dtype=torch.int64) * bits).view(1, pf, 1)
    return _to_int32((v << shifts).sum(dim=1))


def pack_gptq_qweight(q_out_in: torch.Tensor, bits: int) -> torch.Tensor:
    """q (out, in) unsigned -> qweight int32 [in/pf, out] (packed along the input dim)."""
    return pack_rows(q_out_in.t(), bits)


def pack_gptq_qzeros(zero_out_ng: torch.Tensor, bits: int, allow_underflow: bool = False) -> tuple[torch.Tensor, int]:
    """z (out, ngroups) unsigned -> qzeros int32 [ngroups, out/pf] storing (z - 1) mod 2^b.
    Returns (qzeros, number of z == 0 entries that wrapped)."""
    z = zero_out_ng.to(torch.int64)
    underflow = int((z == 0).sum())
    if underflow and not allow_underflow:
        raise ValueError(
            f"{underflow} zero point(s) equal 0: GPTQ v1 stores zero-1 and cannot represent them "
            "(use the AWQ GEMM layout, a GPTQ v2 writer, or allow_zero_underflow=True to accept the wrap)"
        )
    stored = (z - 1) & ((1 << bits) - 1)
    return _pack_cols(stored.t(), bits), underflow


def _pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (R, C) along dim 1: word [r, c] = sum_j values[r, c*pf + j] << (bits*j)."""
    return pack_rows(values.t(), bits).t().contiguous()


def _gptq_layer(layer: CTLayer, expect: tuple, allow_zero_underflow: bool, stats: dict) -> dict[str, torch.Tensor]:
    if (layer.bits, layer.group_size or -1, layer.symmetric) != expect:
        raise ValueError(f"{layer.name}: (bits, group_size, sym) differs from the config's {expect}")
    if layer.bits not in GPTQ_BITS:
        raise ValueError(f"{layer.name}: GPTQ v1 writer supports {GPTQ_BITS}-bit, got {layer.bits}")
    out_f, in_f = layer.shape
    pf = 32 // layer.bits
    if in_f % pf or out_f % pf:
        raise ValueError(f"{layer.name}: shape {layer.shape} not a multiple of {pf} (GPTQ int32 packing)")
    s16 = check_fp16_scale(layer)
    qzeros, underflow = pack_gptq_qzeros(layer.zero, layer.bits, allow_zero_underflow)
    stats["zero_underflow"] += underflow
    stats["max_abs_dw_vs_original_scale"] = max(stats["max_abs_dw_vs_original_scale"], scale_cast_error(layer, s16))
    return {
        "qweight": pack_gptq_qweight(layer.q, layer.bits),
        "qzeros": qzeros,
        "scales": s16.t().contiguous(),
        "g_idx": layer.g_idx.to(torch.int32),
    }


def _global_params(ct_dir: Path) -> tuple[int, int, bool, bool]:
    """(bits, group_size, sym, desc_act) for the whole model: v1 configs are global. Read from the
    config groups; desc_act from any real (non-trivial) weight_g_idx without unpacking weights."""
    qc = quantization_config(ct_dir)
    seen = set()
    for group in qc.get("config_groups", {}).values():
        w = group.get("weights") or {}
        gs = int(w["group_size"]) if w.get("strategy") == "group" else -1
        seen.add((int(w.get("num_bits", 0)), gs, bool(w.get("symmetric", True))))
    if len(seen) != 1:
        raise ValueError(f"{ct_dir}: GPTQ v1 needs one (bits, group_size, sym) for all layers, found {sorted(seen)}")
    bits, gs, sym = seen.pop()
    desc_act = False
    for path in shard_files(ct_dir):
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                if k.endswith(".weight_g_idx"):
                    g = f.get_tensor(k)
                    desc_act |= bool((g >= 0).all()) and not torch.equal(
                        g.to(torch.int32), torch.arange(g.numel(), dtype=torch.int32) // (gs if gs > 0 else g.numel()))
    return bits, gs, sym, desc_act


def write_gptq_v1(
    ct_dir: str | Path,
    out_dir: str | Path,
    *,
    damp_percent: float = 0.01,
    true_sequential: bool = True,
    other_dtype: torch.dtype = torch.float16,
    allow_zero_underflow: bool = False,
) -> dict:
    """Convert a compressed-tensors pack-quantized checkpoint into an AutoGPTQ v1 checkpoint.
    ``damp_percent``/``true_sequential`` are metadata only (the integers come from the input)."""
    ct_dir, out_dir = Path(ct_dir), Path(out_dir)
    bits, group_size, sym, desc_act = _global_params(ct_dir)
    stats = {"zero_underflow": 0, "max_abs_dw_vs_original_scale": 0.0}
    _, names = rewrite_checkpoint(ct_dir, out_dir, lambda l: _gptq_layer(l, (bits, group_size, sym), allow_zero_underflow, stats), other_dtype)
    qcfg = {
        "bits": bits,
        "group_size": group_size,
        "damp_percent": damp_percent,
        "desc_act": desc_act,
        "static_groups": False,
        "sym": sym,
        "true_sequential": true_sequential,
        "lm_head": any(n == "lm_head" or n.endswith(".lm_head") for n in names),
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "meta": {"quantizer": ["quantkit"], "source_format": "compressed-tensors",
                 "source_ignore": quantization_config(ct_dir).get("ignore")},
    }
    (out_dir / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
    write_config(ct_dir, out_dir, qcfg, other_dtype)
    return {"out_dir": str(out_dir), "layers": names, "quantize_config": qcfg, **stats}


# ---- reader: written from the format description above, not from the writer's helpers ----

def read_gptq_v1(model_dir: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """Unpack every Linear of a GPTQ v1 checkpoint. Returns {module: {q (out,in) int16, zero (out,ng) int16
    (decoded as stored+1), scale (out,ng) fp16, g_idx (in,), weight (out,in) fp16}}."""
    model_dir = Path(model_dir)
    qc = json.loads((model_dir / "quantize_config.json").read_text())
    bits = int(qc["bits"])
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)  # nibble j at bits*j, lowest first
    raw: dict[str, dict[str, torch.Tensor]] = {}
    for path in shard_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                mod, _, suffix = k.rpartition(".")
                if suffix in ("qweight", "qzeros", "scales", "g_idx"):
                    raw.setdefault(mod, {})[suffix] = f.get_tensor(k)
    layers = {}
    for mod, t in raw.items():
        qweight, qzeros, scales, g_idx = t["qweight"], t["qzeros"], t["scales"], t["g_idx"].long()
        assert qweight.dtype == torch.int32 and qzeros.dtype == torch.int32 and scales.dtype == torch.float16
        # [in/pf, out] -> [in/pf, pf, out] -> [in, out]
        iw = ((qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask).reshape(-1, qweight.shape[1]).to(torch.int16)
        # [ng, out/pf] -> [ng, out/pf, pf] -> [ng, out]; v1 stores zero-1 (mask, then +1, as AutoGPTQ does)
        iz = (((qzeros.unsqueeze(2) >> shifts.view(1, 1, -1)) & mask) + 1).reshape(qzeros.shape[0], -1).to(torch.int16)
        w = scales[g_idx] * (iw - iz[g_idx])  # [in, out], fp16 result of one rounding
        layers[mod] = {"q": iw.t(), "zero": iz.t(), "scale": scales.t(), "g_idx": g_idx.to(torch.int32), "weight": w.t()}
    return layers
