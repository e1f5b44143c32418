"""Tiny random checkpoints of the architectures people quantize (2 layers, hidden 64), with a real tokenizer.

Each family gets a tokenizer of its own kind, so llama.cpp's converter, llama.cpp's vocabulary loader and
transformers' GGUF tokenizer converters all take their real path: the demo model's (SmolLM2, GPT-2-style BPE
that the converter recognizes) for the BPE families, and a SentencePiece model trained here on C4 text (offline,
about a second) for Gemma (Gemma's special tokens, no dummy prefix) and Phi-3 (Llama 2's conventions, Phi-3's
chat tokens). Weights are drawn with a large init scale, so a model is confidently (and
randomly) opinionated: its perplexity depends strongly on every weight, and a wrongly loaded or wrongly
quantized tensor moves it far, which a near-uniform random model (ppl ~ vocab whatever the weights) would hide.
"""
from __future__ import annotations

import json
import os
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
    # query_pre_attn_scalar = head_dim, as in every Gemma 2/3 below 27B (the default, 256, is the 2B's head_dim)
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=16, tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=16, tie_word_embeddings=True)),
    "phi3": ("Phi3Config", dict(pad_token_id=0)),
    "qwen3-moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[])),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
}
MOE = ("qwen3-moe", "mixtral")
# SentencePiece families -> (transformers tokenizer class, trainer options: special tokens and whitespace rules)
SPM = {
    "gemma": ("GemmaTokenizer", dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
                                     bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=["<mask>"],
                                     add_dummy_prefix=False, allow_whitespace_only_pieces=True)),
    # Llama 2's conventions plus Phi-3's chat tokens (llama.cpp's vocabulary loader looks up <|endoftext|> by name
    # in any model called Phi-3)
    "phi3": ("LlamaTokenizer", dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>",
                                    eos_piece="</s>", add_dummy_prefix=True,
                                    user_defined_symbols=["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"])),
}
SPM_FAMILY = {"gemma2": "gemma", "gemma3": "gemma", "phi3": "phi3"}
SPM_IDS = {"gemma": dict(pad_token_id=0, eos_token_id=1, bos_token_id=2), "phi3": dict(bos_token_id=1, eos_token_id=2)}
# Cells the tiny checkpoints cannot take, although real checkpoints of the family can: transformers 5 rebuilds any
# Qwen 2 tokenizer as Qwen2Tokenizer (Qwen's pre-tokenizer), and llama.cpp's converter recognizes a BPE
# pre-tokenizer only by the token ids of its real 151k vocabulary, which no tiny vocabulary reproduces
NO_GGUF = {"qwen2.5": "transformers rebuilds any Qwen 2 tokenizer as Qwen2Tokenizer, which the converter "
                      "recognizes only with Qwen's real 151k vocabulary"}
# ... the import test still gets a Qwen 2 GGUF: converted with the tokenizer of another fixture's GGUF (the same
# borrowed vocabulary), as quantkit converts an imported model (formats/_gguf_vocab.py)
GGUF_VOCAB_FROM = {"qwen2.5": "qwen3"}


def _data_dir() -> Path:
    return Path(os.environ.get("QUANTKIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def write_spm_tokenizer(out: Path, family: str, vocab_size: int = 1000) -> None:
    """A SentencePiece BPE model (tokenizer.model, byte fallback) trained on C4 text, plus its transformers
    tokenizer files (tokenizer.json written by the family's own tokenizer class from tokenizer.model)."""
    import sentencepiece as spm
    import transformers

    cls_name, opts = SPM[family]
    lines = (_data_dir() / "c4" / "c4-train-sample.jsonl").read_text().splitlines()[:300]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(json.loads(line)["text"] for line in lines), model_prefix=str(out / "tokenizer"),
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=0.9995,
        normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1, minloglevel=2, **opts)
    (out / "tokenizer.vocab").unlink()
    specials = {k.removesuffix("_piece") + "_token": v for k, v in opts.items() if k.endswith("_piece")}
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": cls_name, **specials}))
    getattr(transformers, cls_name).from_pretrained(out).save_pretrained(out)


def make_tiny(arch: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random `arch` checkpoint (safetensors + the tokenizer) to out; declares random weights."""
    import torch
    import transformers

    from quantkit.sanity import declare_random_weights

    cls_name, extra = ARCHS[arch]
    out.mkdir(parents=True, exist_ok=True)
    if arch in SPM_FAMILY:
        write_spm_tokenizer(out, SPM_FAMILY[arch])
        extra = {**SPM_IDS[SPM_FAMILY[arch]], **extra}
    else:
        for f in TOKENIZER_FILES:
            shutil.copyfile(tokenizer_dir / f, out / f)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    cfg = getattr(transformers, cls_name)(**{**COMMON, "vocab_size": len(tok), **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    declare_random_weights(out, f"tests/tiny_models.py ({arch})")
    return out
