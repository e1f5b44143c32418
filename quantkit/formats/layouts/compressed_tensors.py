"""Read a compressed-tensors ``pack-quantized`` checkpoint (llm-compressor output) into plain integers.

Conventions (compressed-tensors 0.19, see research/anchors.md §7.3):
- ``weight_packed`` int32 (out, ceil(in*b/32)): signed values q_s in [-2^(b-1), 2^(b-1)-1] are
  offset by +2^(b-1) and packed along the *input* dim, element 0 in the lowest bits.
- ``weight_zero_point`` (asymmetric group/channel only): the signed zero point, offset and packed the
  same way but along dim 0 (output rows), shape (ceil(out*b/32), ngroups). Older writers stored it
  unpacked as int8 (out, ngroups); both are accepted.
- Symmetric schemes store no zero point; their signed zero is 0, i.e. 2^(b-1) unsigned.
- ``weight_g_idx`` (act-order "group") was removed in compressed-tensors 0.19 (actorder='group' is a
  validation error there), but older artifacts may carry it; an all -1 tensor means "unused".

Everything here is expressed in the *unsigned* domain used by GPTQ/AWQ: q, z in [0, 2^b-1] and
W = (q - z) * s, which equals compressed-tensors' (q_s - z_s) * s because both are offset by 2^(b-1).
"""
from __future__ import annotations

import json
import re
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from safetensors import safe_open
from safetensors.torch import save_file

# Suffixes owned by a pack-quantized Linear; everything else is copied through as a plain tensor.
CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
# Files a classic checkpoint should carry over besides weights and config.json.
AUX_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "preprocessor_config.json",
)


@dataclass
class CTLayer:
    """One quantized Linear in the unsigned domain. ``scale`` keeps the checkpoint's dtype."""

    name: str
    bits: int
    group_size: int | None  # None for channel strategy (one group spanning all inputs)
    symmetric: bool
    q: torch.Tensor  # uint8 (out, in), values in [0, 2^bits - 1]
    scale: torch.Tensor  # (out, ngroups), checkpoint dtype (fp32/bf16/fp16)
    zero: torch.Tensor  # uint8 (out, ngroups), unsigned zero point
    g_idx: torch.Tensor  # int32 (in,), group of each input column
    explicit_g_idx: bool  # True when the checkpoint carried a real weight_g_idx

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def ngroups(self) -> int:
        return self.scale.shape[1]

    def has_trivial_g_idx(self) -> bool:
        gs = self.group_size or self.q.shape[1]
        default = torch.arange(self.q.shape[1], dtype=torch.int32) // gs
        return torch.equal(self.g_idx, default)


def dequantize(layer: CTLayer, scale: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W[o, i] = (q - z)[o, g_idx[i]] * s[o, g_idx[i]] in the scale's dtype (same op order as
    compressed-tensors' ``_dequantize``: integer difference cast to the scale dtype, then one multiply).
    Pass ``scale`` to substitute e.g. the fp16-cast scale a classic format stores."""
    s = layer.scale if scale is None else scale
    g = layer.g_idx.long()
    diff = layer.q.to(torch.int16) - layer.zero.to(torch.int16)[:, g]
    w = diff.to(s.dtype) * s[:, g]
    return w if dtype is None else w.to(dtype)


def load_config(ct_dir: str | Path) -> dict:
    return json.loads((Path(ct_dir) / "config.json").read_text())


def write_config(ct_dir: str | Path, out_dir: Path, qcfg: dict, other_dtype) -> None:
    """The source's config.json with the export's `quantization_config`; fp16 when the export stores its
    unquantized tensors in fp16 (the classic GPTQ/AWQ kernels' dtype)."""
    config = load_config(ct_dir)
    config["quantization_config"] = qcfg
    if other_dtype == torch.float16:
        config["torch_dtype"] = config["dtype"] = "float16"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def quantization_config(ct_dir: str | Path) -> dict:
    qc = load_config(ct_dir).get("quantization_config")
    if not qc or qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{ct_dir}: config.json has no compressed-tensors quantization_config")
    return qc


def _weight_args(qc: dict, name: str) -> dict:
    """Quantization args of the config group whose targets match ``name`` (packed modules are Linear)."""
    for group in qc.get("config_groups", {}).values():
        for t in group.get("targets", []):
            hit = (
                t == "Linear"
                or (t.startswith("re:") and re.match(t[3:], name))
                or name == t
                or name.endswith("." + t)
            )
            if hit:
                fmt = group.get("format") or qc.get("format")
                if fmt != "pack-quantized":
                    raise ValueError(f"{name}: format {fmt!r} is not pack-quantized")
                if group.get("input_activations") or group.get("output_activations"):
                    raise ValueError(f"{name}: activation quantization cannot be expressed in GPTQ/AWQ layouts")
                return group["weights"]
    raise ValueError(f"{name}: no config group targets this packed module")


def shard_files(ct_dir: str | Path) -> list[Path]:
    d = Path(ct_dir)
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        names = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
        return [d / n for n in names]
    if (d / "model.safetensors").exists():
        return [d / "model.safetensors"]
    raise FileNotFoundError(f"{ct_dir}: no model.safetensors or model.safetensors.index.json")


def _build_layer(name: str, t: dict[str, torch.Tensor], args: dict) -> CTLayer:
    bits, strategy = int(args["num_bits"]), args.get("strategy")
    if args.get("type", "int") != "int" or not 1 <= bits <= 8:
        raise ValueError(f"{name}: only int1..8 weights are supported, got {args.get('type')}{bits}")
    if strategy not in ("group", "channel"):
        raise ValueError(f"{name}: strategy {strategy!r} unsupported (need group or channel)")
    out_f, in_f = (int(v) for v in t["weight_shape"].tolist())
    offset = 1 << (bits - 1)
    # unpack_from_int32 returns the signed int8 values (offset already removed): add it back.
    q = (unpack_from_int32(t["weight_packed"], bits, torch.Size((out_f, in_f))).to(torch.int16) + offset).to(torch.uint8)
    scale = t["weight_scale"]
    if scale.ndim == 1:
        scale = scale.unsqueeze(1)
    ng = scale.shape[1]
    symmetric = bool(args.get("symmetric", True))
    zp = t.get("weight_zero_point")
    if symmetric or zp is None:
        if not symmetric:
            raise ValueError(f"{name}: asymmetric scheme but no weight_zero_point")
        zero = torch.full((out_f, ng), offset, dtype=torch.uint8)
    elif zp.dtype == torch.int32 and tuple(zp.shape) != (out_f, ng):
        zero = (unpack_from_int32(zp, bits, torch.Size((out_f, ng)), packed_dim=0).to(torch.int16) + offset).to(torch.uint8)
    else:  # legacy: unpacked signed zero point (out, ng)
        zero = (zp.reshape(out_f, ng).to(torch.int16) + offset).to(torch.uint8)
    group_size = int(args["group_size"]) if strategy == "group" else None
    g = t.get("weight_g_idx")
    explicit = g is not None and bool((g >= 0).all())
    if explicit:
        g_idx = g.to(torch.int32)
    else:
        g_idx = torch.arange(in_f, dtype=torch.int32) // (group_size or in_f)
    if int(g_idx.max()) >= ng:
        raise ValueError(f"{name}: g_idx refers to group {int(g_idx.max())} but only {ng} scale groups")
    return CTLayer(name, bits, group_size, symmetric, q, scale, zero, g_idx, explicit)


def iter_shards(ct_dir: str | Path) -> Iterator[tuple[Path, dict[str, CTLayer], dict[str, torch.Tensor]]]:
    """Yield (shard path, quantized layers, other tensors) shard by shard (bounded memory). A layer is
    yielded with the shard holding its ``weight_packed``; transformers may put its scale/zero point in
    another shard, so companions are fetched through the (lazy, mmapped) handles of all shards."""
    qc = quantization_config(ct_dir)
    paths = shard_files(ct_dir)
    with ExitStack() as stack:
        handles = {p: stack.enter_context(safe_open(str(p), framework="pt")) for p in paths}
        where = {k: p for p, h in handles.items() for k in h.keys()}
        for path in paths:
            keys = list(handles[path].keys())
            other = {}
            layers = {}
            for k in keys:
                mod, _, suffix = k.rpartition(".")
                if suffix == "weight_packed":
                    t = {sfx: handles[where[f"{mod}.{sfx}"]].get_tensor(f"{mod}.{sfx}")
                         for sfx in CT_SUFFIXES if f"{mod}.{sfx}" in where}
                    layers[mod] = _build_layer(mod, t, _weight_args(qc, mod))
                elif suffix in CT_SUFFIXES:
                    if f"{mod}.weight_packed" not in where:
                        raise ValueError(f"{k}: compressed-tensors tensor without weight_packed (format not pack-quantized?)")
                else:
                    other[k] = handles[path].get_tensor(k)
            yield path, layers, other


def read_compressed_tensors(ct_dir: str | Path) -> tuple[dict[str, CTLayer], dict[str, torch.Tensor]]:
    """All quantized layers and all other tensors of a (small enough) checkpoint."""
    layers: dict[str, CTLayer] = {}
    other: dict[str, torch.Tensor] = {}
    for _, lay, oth in iter_shards(ct_dir):
        layers.update(lay)
        other.update(oth)
    return layers, other


def rewrite_checkpoint(
    ct_dir: str | Path,
    out_dir: str | Path,
    layer_fn: Callable[[CTLayer], dict[str, torch.Tensor]],
    other_dtype: torch.dtype | None,
) -> tuple[Path, list[str]]:
    """Stream the CT checkpoint into ``out_dir``: each quantized layer becomes the tensors returned by
    ``layer_fn`` (keyed by suffix), other floating tensors are cast to ``other_dtype``. Shard names and
    the index are kept. Copies tokenizer/generation files; config.json is left to the caller."""
    src, out = Path(ct_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    names: list[str] = []
    total = 0
    for path, layers, other in iter_shards(src):
        tensors: dict[str, torch.Tensor] = {}
        for k, v in other.items():
            tensors[k] = v.to(other_dtype) if other_dtype is not None and v.is_floating_point() else v
        for mod, layer in layers.items():
            names.append(mod)
            for suffix, v in layer_fn(layer).items():
                tensors[f"{mod}.{suffix}"] = v
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, str(out / path.name), metadata={"format": "pt"})
        total += sum(v.numel() * v.element_size() for v in tensors.values())
        weight_map.update({k: path.name for k in tensors})
    if (src / "model.safetensors.index.json").exists():
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for name in AUX_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    return out, sorted(names)


def check_fp16_scale(layer: CTLayer) -> torch.Tensor:
    """The fp16 scale a classic checkpoint stores; refuse values fp16 cannot hold (inf / flushed to 0)."""
    s16 = layer.scale.to(torch.float16)
    if not torch.isfinite(s16).all() or bool(((s16 == 0) & (layer.scale != 0)).any()):
        raise ValueError(f"{layer.name}: scale out of fp16 range; GPTQ/AWQ store fp16 scales")
    return s16


def scale_cast_error(layer: CTLayer, s16: torch.Tensor) -> float:
    """max |W(original-precision scale) - W(fp16 scale)|, both computed in fp32."""
    a = dequantize(layer, scale=layer.scale.float())
    b = dequantize(layer, scale=s16.float())
    return float((a - b).abs().max())
