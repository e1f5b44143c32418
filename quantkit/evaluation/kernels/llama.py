"""The compiled engine's model definition (gpt-fast design): a Llama-family decoder with a static KV cache.

Why not the transformers model itself: its decode step builds masks and cache bookkeeping in Python on every
call, which is what a CUDA graph must not contain (the 1.5 ms/step loop measured in research/gpu-engines.md),
and it keeps the linears as `nn.Linear`. Here the linears are whatever module `make_linear` returns (kernel-
backed), the KV cache is a pair of preallocated buffers written in place, and one decode step is a
pure function of (token ids, position) that can be captured in a CUDA graph. Norm, rotary embedding and
activation are transformers' own (`LlamaRMSNorm`, `LlamaRotaryEmbedding`, `ACT2FN`), so the arithmetic matches
the transformers engine's; tests check the perplexities agree.

Covered: `model_type` llama / mistral (without sliding window) / qwen2 (q/k/v bias): the architectures whose
decoder is norm -> GQA attention with rotary -> norm -> gated MLP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.evaluation.kernels.attention import DEFAULT as DEFAULT_ATTENTION
from quantkit.evaluation.kernels.attention import check_variant, decode_attention, decode_mask

SUPPORTED = ("llama", "mistral", "qwen2")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def unsupported(config) -> str | None:
    """Why this model cannot run here (None if it can)."""
    if config.model_type not in SUPPORTED:
        return f"model_type {config.model_type!r} (supported: {', '.join(SUPPORTED)})"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) and \
            config.model_type == "mistral":
        return "sliding-window attention"
    return None


class KVCache(nn.Module):
    def __init__(self, shape, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device))


class Attention(nn.Module):
    def __init__(self, config, make_linear, prefix: str, fused: bool = False, attention: str = DEFAULT_ATTENTION):
        super().__init__()
        self.attention = check_variant(attention)  # the decode attention (kernels/attention.py)
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        if fused:  # one GEMM for q, k and v (kernels/fuse.py)
            self.qkv_proj = make_linear(f"{prefix}.qkv_proj")
        else:
            self.q_proj = make_linear(f"{prefix}.q_proj")
            self.k_proj = make_linear(f"{prefix}.k_proj")
            self.v_proj = make_linear(f"{prefix}.v_proj")
        self.o_proj = make_linear(f"{prefix}.o_proj")
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, pos, mask=None):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        b, t, _ = x.shape
        if hasattr(self, "qkv_proj"):
            kv = self.n_kv * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim, kv, kv], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.reshape(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if self.cache is not None:  # gpt-fast's pattern: an in-place index_put on a buffer (inductor keeps it in place)
            self.cache.k[:, :, pos] = k
            self.cache.v[:, :, pos] = v
        if t > 1 or self.cache is None:  # scoring / prefill from position 0: causal attention over the new tokens
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_heads != self.n_kv)
        else:  # decode: one query per sequence against the whole cache; `mask` from the decoder, once per step
            y = decode_attention(self.attention, q, self.cache.k, self.cache.v, pos, mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config, make_linear, prefix: str, fused: bool = False):
        super().__init__()
        from transformers.activations import ACT2FN

        if fused:  # one GEMM for gate and up (kernels/fuse.py)
            self.gate_up_proj = make_linear(f"{prefix}.gate_up_proj")
        else:
            self.gate_proj = make_linear(f"{prefix}.gate_proj")
            self.up_proj = make_linear(f"{prefix}.up_proj")
        self.down_proj = make_linear(f"{prefix}.down_proj")
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)


class Block(nn.Module):
    def __init__(self, config, make_linear, i: int, fused: frozenset = frozenset(), attention: str = DEFAULT_ATTENTION):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config, make_linear, f"model.layers.{i}.self_attn", "self_attn.qkv_proj" in fused,
                                   attention)
        self.mlp = MLP(config, make_linear, f"model.layers.{i}.mlp", "mlp.gate_up_proj" in fused)

    def forward(self, x, cos, sin, pos, mask=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, pos, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    """Parameter names follow the HF checkpoint (`model.layers.N....`, `lm_head`), so `load_state_dict` takes
    the artifact's non-linear tensors as they are. `fused`: the groups of kernels/fuse.py built as one linear."""

    def __init__(self, config, make_linear, fused: frozenset = frozenset(), attention: str = DEFAULT_ATTENTION):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(Block(config, make_linear, i, fused, attention) for i in range(config.num_hidden_layers))
        self.model.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = make_linear("lm_head")
        self.rotary = LlamaRotaryEmbedding(config)

    def setup_cache(self, batch: int, max_len: int, dtype, device) -> None:
        """Slots rounded up to a multiple of 64 (masked beyond the position): with an odd length the decode
        attention's GEMM lost its 16-byte alignment and cuBLAS fell back to a 2-element-aligned kernel (run 3's
        profile, a 2076-slot cache: 0.97 ms of attention per step; 0.46 ms at 2064 slots in run 4)."""
        max_len = -(-max_len // 64) * 64
        for layer in self.model.layers:
            a = layer.self_attn
            a.cache = KVCache((batch, a.n_kv, max_len, a.head_dim), dtype, device)

    def set_attention(self, variant: str) -> None:
        """The decode attention (kernels/attention.py); compiled layers retrace on the change."""
        for layer in self.model.layers:
            layer.self_attn.attention = check_variant(variant)

    def drop_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.cache = None

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """ids (batch, t) at positions `pos` (t,) -> logits (batch, t, vocab), or (batch, 1, vocab) for the
        last position only (generation needs no more: a 2048-token prefill at batch 64 would otherwise
        materialise 33 GB of logits)."""
        x = self.model.embed_tokens(ids)
        cos, sin = self.rotary(x, pos.unsqueeze(0))
        cache = self.model.layers[0].self_attn.cache if len(self.model.layers) else None
        mask = decode_mask(pos, cache.k.shape[2], cache.k.dtype) if cache is not None and ids.shape[1] == 1 else None
        for layer in self.model.layers:
            x = layer(x, cos, sin, pos, mask)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))
