"""Tiny random checkpoints of the architectures people quantize (2 layers, hidden 64), with a real tokenizer.

The tokenizer is the demo model's (SmolLM2, GPT-2-style BPE that llama.cpp's converter recognizes), so every
checkpoint also converts to GGUF. Weights are drawn with a large init scale, so a model is confidently (and
randomly) opinionated: its perplexity depends strongly on every weight, and a wrongly loaded or wrongly
quantized tensor moves it far, which a near-uniform random model (ppl ~ vocab whatever the weights) would hide.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
              pad_token_id=None, initializer_range=0.5)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# name -> (transformers config class, extra config fields)
ARCHS: dict[str, tuple[str, dict]] = {
    "llama3": ("LlamaConfig", dict(rope_theta=500000.0)),
    "qwen2.5": ("Qwen2Config", dict(attention_bias=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, tie_word_embeddings=True)),
    "phi3": ("Phi3Config", dict(pad_token_id=0)),
    "qwen3-moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[])),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
}
MOE = ("qwen3-moe", "mixtral")
# Phi-4 style: llama.cpp's Phi-3 converter takes the GPT-2 BPE path only for this tokenizer class
TOKENIZER_CLASS = {"phi3": "GPT2Tokenizer"}
# Cells the tiny checkpoints cannot take, although real checkpoints of the family can: llama.cpp's converter
# needs Gemma 2's SentencePiece tokenizer.model, and transformers 5 rebuilds any Qwen 2 tokenizer with Qwen's
# own pre-tokenizer, which with SmolLM2's vocabulary hashes to nothing the converter knows
NO_GGUF = {"gemma2": "Gemma 2's converter reads only a SentencePiece tokenizer.model",
           "qwen2.5": "transformers rebuilds the borrowed tokenizer as Qwen2Tokenizer, unknown to the converter",
           "phi3": "llama.cpp's Phi-3 vocabulary loader cannot read the borrowed BPE tokenizer (unordered_map::at)"}


def make_tiny(arch: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random `arch` checkpoint (safetensors + the tokenizer) to out; declares random weights."""
    import torch
    import transformers

    from quantkit.sanity import declare_random_weights

    cls_name, extra = ARCHS[arch]
    out.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / f, out / f)
    if arch in TOKENIZER_CLASS:
        cfg_path = out / "tokenizer_config.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "tokenizer_class": TOKENIZER_CLASS[arch]}))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    cfg = getattr(transformers, cls_name)(**{**COMMON, "vocab_size": len(tok), **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    declare_random_weights(out, f"tests/tiny_models.py ({arch})")
    return out
