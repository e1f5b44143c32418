"""One GEMM where the decoder has several on the same input: q/k/v -> `qkv_proj`, gate/up -> `gate_up_proj`.

Why: at batch-1 decode each linear is a memory-bound GEMV of a few microseconds, and the small k/v projections
(1024 x 4096 on Llama-3-8B) cost a kernel's fixed latency for well under a microsecond of weight traffic; one
launch per group reads the same bytes with fewer tails (gpt-fast and vLLM fuse the same groups).
Fusion only concatenates along the output dimension, so the fused module computes exactly the function of the
separate ones; it is done only where the parts can share one kernel call:
- same kind, bias on all or none;
- fp8: the same activation scale (static scales equal, or all dynamic); per-tensor weight scales that differ
  become per-row scales (the same numbers, repeated), which the kernel applies in its epilogue;
- int4: same group size, same column order (`perm`) and the same AWQ `pre_quant_scale`.
Otherwise the group stays separate (the decoder runs either form).
"""
from __future__ import annotations

import torch

from quantkit.evaluation.kernels.weights import QuantWeight

GROUPS = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def _same(ts) -> bool:
    return all(t is None for t in ts) or (all(t is not None for t in ts)
                                          and all(t.shape == ts[0].shape and torch.equal(t, ts[0]) for t in ts))


def _cat(ts, dim=0):
    return None if ts[0] is None else torch.cat(list(ts), dim)


def concat(parts: list[QuantWeight]) -> QuantWeight | None:
    """The parts as one weight with their outputs stacked, or None where one kernel call cannot serve them."""
    kind = parts[0].kind
    if any(p.kind != kind for p in parts) or len({p.bias is None for p in parts}) > 1:
        return None
    bias = _cat([p.bias for p in parts])
    if kind == "dense":
        return QuantWeight("dense", weight=torch.cat([p.weight for p in parts]), bias=bias)
    if kind in ("fp8", "int8"):
        if not _same([p.input_scale for p in parts]):
            return None
        scales = [p.weight_scale.float() for p in parts]
        if all(s.dim() == 0 for s in scales) and _same(scales):
            ws = scales[0]
        else:  # per-row: a per-tensor scale repeated over its rows
            ws = torch.cat([s.expand(p.shape[0]) if s.dim() == 0 else s for s, p in zip(scales, parts)])
        return QuantWeight(kind, weight=torch.cat([p.weight for p in parts]), weight_scale=ws,
                           input_scale=parts[0].input_scale, bias=bias)
    if len({p.group_size for p in parts}) > 1 or not _same([p.perm for p in parts]) \
            or not _same([p.pre_quant_scale for p in parts]):
        return None
    return QuantWeight("int4", q=_cat([p.q for p in parts]), scale=_cat([p.scale for p in parts]),
                       zero=_cat([p.zero for p in parts]), group_size=parts[0].group_size, perm=parts[0].perm,
                       pre_quant_scale=parts[0].pre_quant_scale, bias=bias)


def fuse_layers(linears: dict[str, QuantWeight], n_layers: int, kinds: set[str]) -> set[str]:
    """Replace each group of every layer by its fused weight, in place, for the groups whose parts are of a
    kind in `kinds` and fuse in every layer (the decoder's layers share one definition). Returns the fused
    group names (keys of GROUPS)."""
    done = set()
    for group, members in GROUPS.items():
        fused = {}
        for i in range(n_layers):
            names = [f"model.layers.{i}.{m}" for m in members]
            parts = [linears.get(n) for n in names]
            if any(p is None or p.kind not in kinds for p in parts) or (w := concat(parts)) is None:
                break
            fused[i] = (names, w)
        else:
            for i, (names, w) in fused.items():
                for n in names:
                    del linears[n]
                linears[f"model.layers.{i}.{group}"] = w
            done.add(group)
    return done
