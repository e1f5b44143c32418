"""Decode attention of the compiled engine: one query per sequence against the whole static KV cache.

Several implementations of the same function, chosen per GPU and batch size by measurement
(`choices.json` "attention", scripts/bench_decode_attention.py; on the H200 "sdpa-gqa", which torch runs on
cuDNN: 0.39 / 1.24 / 4.14 ms per step of 32 layers at batch 1 / 16 / 64 against 0.46 / 1.58 / 5.17 for
"matmul", docs/benchmarks/h200/ run 4). Variants:

- "matmul": the query heads of one KV head as rows of a batched matmul, mask, fp32 softmax, matmul (the
  reference: the engine's original path);
- "matmul-bias": the same with both products in fp32 (no bf16 rounding of the scores);
- "sdpa-gqa": `F.scaled_dot_product_attention(..., attn_mask=mask, enable_gqa=True)` (torch's dispatcher
  picks the backend);
- "sdpa-grouped": SDPA with the query heads of a KV head folded into the query length (no GQA expansion, any
  backend that takes a mask);
- "sdpa-repeat": gpt-fast's pattern: K/V repeated to every query head, SDPA with the mask;
- "flex": `flex_attention` with a score_mod that masks keys after the position (under torch.compile this is
  its split-KV decoding kernel; eagerly, torch's unfused reference);
- "reduce": the two products as elementwise multiply + sum, left to inductor to fuse with the softmax.
All take q (b, heads, 1, d), the caches (b, kv_heads, L, d), the positions `pos` (the last is the query's) and
`mask` (1, 1, 1, L), additive in q's dtype: 0 for keys at or before it, -inf after (computed once per step by
the decoder, so that no layer converts a bool mask again), and return (b, heads, 1, d) in q's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT = "matmul"


def decode_mask(pos: torch.Tensor, length: int, dtype=torch.float32) -> torch.Tensor:
    """(1, 1, 1, length) additive mask: 0 for the keys a query at position pos[-1] attends to, -inf after."""
    keys = torch.arange(length, device=pos.device).view(1, 1, 1, length)
    return torch.zeros((), dtype=dtype, device=pos.device).masked_fill(keys > pos[-1], float("-inf"))


def _grouped(q, n_kv):
    b, h, _, d = q.shape
    return q.reshape(b, n_kv, h // n_kv, d)


def matmul(q, k, v, pos, mask):
    b, h, _, d = q.shape
    scores = (_grouped(q, k.shape[1]) @ k.transpose(-1, -2)).float() * d ** -0.5 + mask.float()
    return (scores.softmax(-1).to(v.dtype) @ v).reshape(b, h, 1, d)


def matmul_bias(q, k, v, pos, mask):
    b, h, _, d = q.shape
    scores = torch.matmul(_grouped(q, k.shape[1]).float() * d ** -0.5, k.transpose(-1, -2).float()) + mask.float()
    return (scores.softmax(-1) @ v.float()).to(q.dtype).reshape(b, h, 1, d)


def sdpa_gqa(q, k, v, pos, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def sdpa_grouped(q, k, v, pos, mask):
    b, h, _, d = q.shape
    return F.scaled_dot_product_attention(_grouped(q, k.shape[1]), k, v, attn_mask=mask).reshape(b, h, 1, d)


def sdpa_repeat(q, k, v, pos, mask):
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask)


def flex(q, k, v, pos, mask):
    from torch.nn.attention.flex_attention import flex_attention

    last = pos[-1:]

    def causal(score, b, h, q_idx, kv_idx):
        return torch.where(kv_idx <= last[0], score, float("-inf"))

    return flex_attention(q, k, v, score_mod=causal, enable_gqa=q.shape[1] != k.shape[1])


def reduce(q, k, v, pos, mask):
    b, h, _, d = q.shape
    qg = _grouped(q, k.shape[1]).float() * d ** -0.5                    # (b, kv, g, d)
    scores = (qg.unsqueeze(-2) * k.unsqueeze(2).float()).sum(-1)         # (b, kv, g, L)
    p = (scores + mask.float()).softmax(-1)
    return (p.unsqueeze(-1) * v.unsqueeze(2).float()).sum(-2).to(q.dtype).reshape(b, h, 1, d)


VARIANTS = {"matmul": matmul, "matmul-bias": matmul_bias, "sdpa-gqa": sdpa_gqa, "sdpa-grouped": sdpa_grouped,
            "sdpa-repeat": sdpa_repeat, "flex": flex, "reduce": reduce}


def decode_attention(variant: str, q, k, v, pos, mask):
    return VARIANTS[variant](q, k, v, pos, mask)


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown decode attention {variant!r} (known: {', '.join(VARIANTS)})")
    return variant
