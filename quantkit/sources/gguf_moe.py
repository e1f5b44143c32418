"""Mixtral from a GGUF file: llama.cpp's `llama` architecture with experts, written as a Mixtral checkpoint.

Written by hand because no library does it: transformers' GGUF loader reads any `llama` GGUF as a dense Llama
and silently drops the experts (`ffn_*_exps`, `ffn_gate_inp`). The mapping, per layer:
- `ffn_gate_inp` [experts, hidden] -> `block_sparse_moe.gate` (the router);
- `ffn_gate_exps` / `ffn_up_exps` [experts, ffn, hidden] -> `experts.N.w1` / `experts.N.w3`;
- `ffn_down_exps` [experts, hidden, ffn] -> `experts.N.w2`;
- everything else as transformers maps a Llama GGUF (gguf-py's name table; q/k rows un-permuted by
  transformers' own LlamaTensorProcessor, the inverse of the converter's permutation).
The checkpoint uses Mixtral's original per-expert names, which every consumer reads (transformers fuses them on
load; vLLM, llm-compressor and llama.cpp's converter read them as published). Tensors are dequantized one at a
time into the only copy, which is saved in shards.
"""
from __future__ import annotations

import re
from pathlib import Path

EXPERTS = re.compile(r"blk\.(?P<bid>\d+)\.ffn_(?P<w>gate|up|down)_exps\.weight")
EXPERT_NAMES = {"gate": "w1", "down": "w2", "up": "w3"}  # Mixtral's names for the expert projections


def is_llama_moe(facts: dict) -> bool:
    """A `llama` GGUF with experts: Mixtral (and its merges)."""
    return facts["arch"] == "llama" and facts["expert_count"] > 0


def _mixtral_config(gguf_path: Path):
    from gguf import GGUFReader
    from transformers import MixtralConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=False)["config"]  # the dense Llama reading
    fields = GGUFReader(str(gguf_path)).fields
    keep = {"max_position_embeddings", "num_hidden_layers", "intermediate_size", "hidden_size", "head_dim",
            "rope_theta", "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "vocab_size",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"}
    cfg = {k: v for k, v in parsed.items() if k in keep}
    cfg["num_local_experts"] = int(fields["llama.expert_count"].contents())
    cfg["num_experts_per_tok"] = int(fields["llama.expert_used_count"].contents())
    cfg["sliding_window"] = None  # llama.cpp's `llama` graph attends to the whole context
    return MixtralConfig(**cfg), parsed


def _hf_names(n_layers: int, tied: bool) -> list[str]:
    per_layer = ["input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj", "block_sparse_moe.gate"]
    names = ["model.embed_tokens", "model.norm"] + ([] if tied else ["lm_head"])
    return names + [f"model.layers.{i}.{p}" for i in range(n_layers) for p in per_layer]


def write_mixtral(gguf_path: Path, out: Path) -> None:
    """Write config.json and sharded safetensors of a Mixtral checkpoint for gguf_path to out."""
    import gguf
    import numpy as np
    import torch
    from huggingface_hub import save_torch_state_dict
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    config, parsed = _mixtral_config(gguf_path)
    n = config.num_hidden_layers
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n)
    to_hf = {name_map.get_name(h) + ".weight": h + ".weight" for h in _hf_names(n, config.tie_word_embeddings)}
    unpermute = LlamaTensorProcessor(config=parsed)
    state: dict[str, torch.Tensor] = {}
    for t in gguf.GGUFReader(str(gguf_path)).tensors:
        w = gguf.dequantize(t.data, t.tensor_type)
        if m := EXPERTS.fullmatch(t.name):
            for e in range(w.shape[0]):
                key = f"model.layers.{m['bid']}.block_sparse_moe.experts.{e}.{EXPERT_NAMES[m['w']]}.weight"
                state[key] = torch.from_numpy(np.array(w[e], dtype=np.float32))
            continue
        if t.name not in to_hf:
            raise ValueError(f"tensor {t.name} has no place in a Mixtral checkpoint")
        state[to_hf[t.name]] = torch.from_numpy(np.array(unpermute.process(w, t.name).weights, dtype=np.float32))
    missing = sorted(set(to_hf.values()) - set(state))
    if missing or not any(".experts." in k for k in state):
        raise ValueError(f"the GGUF lacks tensors a Mixtral needs: {missing[:4] or 'experts'}")
    config.architectures = ["MixtralForCausalLM"]
    config.save_pretrained(out)
    save_torch_state_dict(state, out, max_shard_size="5GB")
