"""An artifact directory's linears as kernel-neutral quantized weights, read from its files.

Every supported layout becomes one of four kinds, whatever wrote it:
- `dense`: a floating weight (N, K).
- `fp8`: E4M3 weight (N, K), weight scale per tensor () or per output row (N,), activation scale static (a
  scalar `input_scale`) or dynamic per token (None).
- `int8`: int8 weight (N, K), per-row scale (N,), activations quantized per token at run time.
- `int4`: unsigned 4-bit values q (N, K), per-group scale and zero point (N, K / group) with
  W = (q - zero) * scale, an optional column order making act-order groups contiguous (`perm`) and an optional
  per-input `pre_quant_scale` (ModelOpt AWQ multiplies activations by it).

Unpacking is the layout readers' (`quantkit.formats.layouts`, the ModelOpt reference engine's `unpack_int4`):
this module only maps their output onto the four kinds. Layouts it cannot map raise `NotServed` with the reason.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


class NotServed(ValueError):
    """The artifact uses a scheme the compiled engine has no kernel for."""


@dataclass
class QuantWeight:
    kind: str  # dense | fp8 | int8 | int4
    weight: torch.Tensor | None = None  # dense: float; fp8: float8_e4m3fn; int8: int8 (N, K)
    weight_scale: torch.Tensor | None = None  # fp8: () or (N,); int8: (N,)
    input_scale: torch.Tensor | None = None  # fp8 static activation scale; None = dynamic per token
    q: torch.Tensor | None = None  # int4: uint8 (N, K) in [0, 15]
    scale: torch.Tensor | None = None  # int4: (N, ngroups)
    zero: torch.Tensor | None = None  # int4: (N, ngroups), unsigned domain
    group_size: int | None = None
    perm: torch.Tensor | None = None  # int4 act-order: input columns in group order
    pre_quant_scale: torch.Tensor | None = None  # (K,)
    bias: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple((self.weight if self.weight is not None else self.q).shape)

    def dequantize(self) -> torch.Tensor:
        """The weight the kernels compute with, in fp32 (N, K), in the artifact's input order."""
        if self.kind == "dense":
            return self.weight.float()
        if self.kind in ("fp8", "int8"):
            s = self.weight_scale.float()
            return self.weight.float() * (s if s.dim() == 0 else s.view(-1, 1))
        g = torch.arange(self.q.shape[1]) // self.group_size
        w = (self.q.float() - self.zero.float()[:, g]) * self.scale.float()[:, g]
        if self.perm is not None:  # w is in group order: put the columns back where the input has them
            w = w[:, torch.argsort(self.perm)]
        return w


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from quantkit.formats.layouts.compressed_tensors import shard_files

    out = {}
    for f in shard_files(path):
        out.update(load_file(str(f)))
    return out


def _int4(q, zero, scale, g_idx=None, group_size=None, **extra) -> QuantWeight:
    """From per-column groups: reorder act-order columns so that every group is contiguous."""
    q = q.to(torch.uint8)
    n_groups = scale.shape[1]
    group_size = group_size or q.shape[1] // n_groups
    perm = None
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(q.shape[1]) // group_size):
        perm = torch.argsort(g_idx.long(), stable=True)
        q = q[:, perm]
    return QuantWeight("int4", q=q.contiguous(), scale=scale, zero=zero.float(), group_size=group_size,
                       perm=perm, **extra)


def _read_modelopt(path: Path, tensors: dict) -> tuple[dict, dict]:
    from quantkit.evaluation.engines.modelopt_reference import read_quant_config, unpack_int4

    qcfg = read_quant_config(path)
    algo, group = qcfg.get("quant_algo"), qcfg.get("group_size")
    if algo not in ("FP8", "W4A16_AWQ"):
        raise NotServed(f"ModelOpt quant_algo {algo!r} (served: FP8, W4A16_AWQ)")
    if qcfg.get("kv_cache_quant_algo"):
        raise NotServed(f"ModelOpt kv_cache_quant_algo {qcfg['kv_cache_quant_algo']!r} (the KV cache here is 16-bit)")
    linears, other = {}, {}
    mods = {k.rpartition(".")[0] for k in tensors if k.endswith(".weight_scale")}
    for mod in mods:
        w, s = tensors.pop(f"{mod}.weight"), tensors.pop(f"{mod}.weight_scale")
        bias = tensors.pop(f"{mod}.bias", None)
        if algo == "FP8":
            linears[mod] = QuantWeight("fp8", weight=w, weight_scale=s.float().reshape(-1) if s.dim() else s.float(),
                                       input_scale=tensors.pop(f"{mod}.input_scale").float(), bias=bias)
        else:  # signed int4 in [-8, 7] -> unsigned with zero point 8
            q = (unpack_int4(w) + 8).to(torch.uint8)
            linears[mod] = _int4(q, torch.full_like(s, 8.0), s, group_size=group, bias=bias,
                                 pre_quant_scale=tensors.pop(f"{mod}.pre_quant_scale", None))
    for k, v in tensors.items():
        if not k.endswith(("input_scale", "weight_scale_2", "output_scale", "k_scale", "v_scale", "pre_quant_scale")):
            other[k] = v
    return linears, other


def _ct_group(qc: dict) -> dict:
    groups = list(qc.get("config_groups", {}).values())
    if len(groups) != 1:
        raise NotServed(f"compressed-tensors with {len(groups)} config groups (served: one)")
    return groups[0]


def _read_ct(path: Path, qc: dict) -> tuple[dict, dict]:
    from quantkit.formats.layouts.compressed_tensors import read_compressed_tensors

    fmt = qc.get("format")
    if fmt == "pack-quantized":
        layers, other = read_compressed_tensors(path)
        linears = {}
        for mod, layer in layers.items():
            if layer.bits != 4:
                raise NotServed(f"{mod}: {layer.bits}-bit weight-only (served: 4-bit)")
            linears[mod] = _int4(layer.q, layer.zero, layer.scale, g_idx=layer.g_idx, group_size=layer.group_size,
                                 bias=other.pop(f"{mod}.bias", None))
        return linears, other
    if fmt not in ("float-quantized", "int-quantized", "naive-quantized"):
        raise NotServed(f"compressed-tensors format {fmt!r}")
    group = _ct_group(qc)
    w_args, a_args = group.get("weights") or {}, group.get("input_activations") or {}
    if not a_args:
        raise NotServed("compressed-tensors 8-bit weight-only (no activation quantization)")
    if not w_args.get("symmetric", True) or not a_args.get("symmetric", True):
        raise NotServed("asymmetric 8-bit weights or activations")
    dynamic = bool(a_args.get("dynamic"))
    if dynamic and a_args.get("strategy") != "token" or not dynamic and a_args.get("strategy") != "tensor":
        raise NotServed(f"activation strategy {a_args.get('strategy')!r} dynamic={dynamic}")
    kind = "fp8" if w_args.get("type") == "float" else "int8"
    if kind == "int8" and not dynamic:
        raise NotServed("INT8 with static activation scales (served: dynamic per token)")
    tensors = _safetensors(path)
    linears = {}
    for mod in sorted({k.rpartition(".")[0] for k in tensors if k.endswith(".weight_scale")}):
        s = tensors.pop(f"{mod}.weight_scale").float()
        tensors.pop(f"{mod}.weight_zero_point", None)
        s = s.reshape(()) if s.numel() == 1 else s.reshape(-1)
        inp = tensors.pop(f"{mod}.input_scale", None)
        tensors.pop(f"{mod}.input_zero_point", None)
        linears[mod] = QuantWeight(kind, weight=tensors.pop(f"{mod}.weight"), weight_scale=s,
                                   input_scale=None if dynamic else inp.float().reshape(()),
                                   bias=tensors.pop(f"{mod}.bias", None))
    return linears, tensors


def _read_classic(path: Path, method: str) -> tuple[dict, dict]:
    from quantkit.formats.layouts.awq_gemm import read_awq_gemm
    from quantkit.formats.layouts.gptq_v1 import read_gptq_v1

    layers = read_gptq_v1(path) if method == "gptq" else read_awq_gemm(path)
    tensors = _safetensors(path)
    linears = {}
    for mod, t in layers.items():
        if int(t["q"].max()) > 15 or int(t["zero"].max()) > 16:
            raise NotServed(f"{mod}: more than 4 bits per weight (served: 4-bit)")
        linears[mod] = _int4(t["q"], t["zero"], t["scale"], g_idx=t["g_idx"], bias=tensors.get(f"{mod}.bias"))
    other = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in layers}
    return linears, other


def read_artifact(path: Path) -> tuple[dict, dict[str, QuantWeight], dict[str, torch.Tensor], str]:
    """(config.json, {linear module: QuantWeight}, {other tensor: value}, layout name). Linears not listed
    (lm_head, ignored layers) are dense and come as `other` tensors `<module>.weight`."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    method = str(qc.get("quant_method", ""))
    if (path / "hf_quant_config.json").exists() or method.startswith("modelopt"):
        linears, other = _read_modelopt(path, _safetensors(path))
        layout = "modelopt"
    elif method == "compressed-tensors":
        linears, other = _read_ct(path, qc)
        layout = f"compressed-tensors/{qc.get('format')}"
    elif method in ("gptq", "awq"):
        if method == "gptq" and (qc.get("checkpoint_format", "gptq") != "gptq" or qc.get("bits") != 4):
            raise NotServed(f"GPTQ checkpoint_format {qc.get('checkpoint_format')!r} bits {qc.get('bits')}")
        linears, other = _read_classic(path, method)
        layout = "gptq-v1" if method == "gptq" else "awq-gemm"
    elif not qc:
        linears, other, layout = {}, _safetensors(path), "dense"
    else:
        raise NotServed(f"quant_method {method!r}")
    return config, linears, other, layout
