"""Import a GGUF file into a dense HF checkpoint (safetensors) with transformers' GGUF loader.

The import proves itself before anything is written (sources/gguf_verify.py): llama.cpp scoring the source
GGUF and transformers scoring the import must agree within 1% perplexity on the same token windows.
`quantkit-import.json` records the source file (a GGUF target built from the import reuses its tokenizer)
and the agreement.

Fixes applied here so every later format starts from a correct checkpoint:
- hyper-parameters transformers' GGUF config mapping drops are set as llama.cpp runs the file (`fix_config`:
  head_dim, the experts' width of Qwen-MoE, Gemma's query scaling, soft-capping and local RoPE base);
- a `llama` GGUF with experts (Mixtral), which transformers would read as a dense Llama without its experts,
  is written by sources/gguf_moe.py;
- transformers marks the model as GGUF-quantized and refuses to save it, although the weights are dense:
  `hf_quantizer.remove_quantization_config` drops that marker.
- for GPT-2-style BPE vocabularies its tokenizer.json gets `byte_fallback: true` and a SentencePiece-like
  decoder, which makes llama.cpp's converter write an SPM tokenizer that crashes llama.cpp. We restore the
  byte-level decoder and turn byte_fallback off; token ids are unchanged (checked below on a sample).
"""
from __future__ import annotations

import json
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

from quantkit.errors import UserError
from quantkit.sources.remote_code import refuse_remote_code

CHECK_TEXT = "The capital of France is Paris.\n\n  Ünïcödé — 東京 🙂 x=1;\ty"


def _gguf_tokenizer_model(path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.ggml.model")
    return bytes(field.parts[field.data[0]]).decode() if field else None


def _fix_bpe_tokenizer(out: Path, eos_id: int | None) -> None:
    tj = out / "tokenizer.json"
    tok = json.loads(tj.read_text())
    tok["model"]["byte_fallback"] = False
    tok["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    tj.write_text(json.dumps(tok, ensure_ascii=False, indent=2))
    tc = out / "tokenizer_config.json"
    if eos_id is not None and tc.exists():
        # the importer takes eos from a chat-template guess; config.json's eos_token_id is authoritative
        vocab = {t["id"]: t["content"] for t in tok.get("added_tokens", [])}
        if eos_id in vocab:
            cfg = json.loads(tc.read_text())
            cfg["eos_token"] = vocab[eos_id]
            cfg["eos_token_id"] = eos_id
            tc.write_text(json.dumps(cfg, ensure_ascii=False, indent=2))


def fix_config(config, facts: dict) -> None:
    """What transformers' GGUF config mapping leaves out or gets wrong, set as llama.cpp runs the file."""
    if facts.get("head_dim"):  # `attention.key_length` is dropped: Qwen3, Gemma get hidden/heads otherwise
        config.head_dim = facts["head_dim"]
    if facts.get("expert_ffn") and hasattr(config, "moe_intermediate_size"):  # Qwen-MoE experts' width
        config.moe_intermediate_size = facts["expert_ffn"]
    if config.model_type in ("gemma2", "gemma3_text"):
        # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B models (hidden/heads; told apart by
        # their layer count); transformers reads query_pre_attn_scalar, which no GGUF carries (default 256)
        big = facts.get("layers") == {"gemma2": 46, "gemma3_text": 62}[config.model_type]
        config.query_pre_attn_scalar = facts["hidden"] // facts["heads"] if big else facts["head_dim"]
        if facts.get("final_softcap") is not None:
            config.final_logit_softcapping = facts["final_softcap"]
    if config.model_type == "gemma2" and facts.get("attn_softcap") is not None:
        config.attn_logit_softcapping = facts["attn_softcap"]
    if config.model_type == "gemma3_text" and facts.get("rope_theta_swa"):  # local layers' RoPE base
        config.rope_parameters["sliding_attention"]["rope_theta"] = facts["rope_theta_swa"]


@contextmanager
def _parsed_once(gguf_path: Path):
    """transformers' GGUF loader parses the whole file again for the tokenizer, the config and the weights, and
    the import's own checks read it too: 8 parses, each ~2 CPU-s for a 49k-token vocabulary (gguf's reader
    makes a numpy view per vocabulary entry and merge). During the import, a `gguf.GGUFReader` of this file in
    read mode is parsed once and shared (nothing writes through a read-mode reader); other files and modes are
    read as before, and the class is put back afterwards."""
    import gguf

    real, shared = gguf.GGUFReader, {}

    def ours(path, mode) -> bool:
        return mode == "r" and Path(path).resolve() == gguf_path

    class ParsedOnce(real):
        def __new__(cls, path, mode="r"):
            return shared["reader"] if ours(path, mode) and "reader" in shared else super().__new__(cls)

        def __init__(self, path, mode="r"):
            if self is not shared.get("reader"):
                super().__init__(path, mode)
                if ours(path, mode):
                    shared["reader"] = self

    gguf.GGUFReader = ParsedOnce
    try:
        yield
    finally:
        gguf.GGUFReader = real


UNREADABLE = (ValueError, KeyError, EOFError, struct.error)  # what the GGUF readers raise on a truncated file


def _unreadable(gguf_path: Path, e: Exception) -> UserError:
    return UserError(f"cannot import {gguf_path}: {type(e).__name__}: {str(e)[:300]}",
                     fix="check the file (truncated download?) and that transformers supports its architecture")


def import_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write a dense fp32 HF checkpoint for gguf_path at out_dir (atomically: a temp dir renamed at the end)."""
    gguf_path = Path(gguf_path).resolve()
    with _parsed_once(gguf_path):
        return _import(gguf_path, out_dir)


def _import(gguf_path: Path, out_dir: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    import torch

    from quantkit.sources.gguf_moe import is_llama_moe, write_mixtral

    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise UserError(f"GGUF file not found: {gguf_path}")
    with open(gguf_path, "rb") as f:
        if f.read(4) != b"GGUF":  # checked here: the readers below fail on other files with deep tracebacks
            raise UserError(f"{gguf_path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        raise UserError(f"{out_dir} already holds a model", fix="choose an empty OUT_DIR or delete it")
    from quantkit.sources.gguf_verify import preflight, verify_import

    try:
        facts = preflight(gguf_path)
    except UNREADABLE as e:
        raise _unreadable(gguf_path, e) from None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=out_dir.parent))
    try:
        kw = dict(gguf_file=gguf_path.name, trust_remote_code=False)
        try:
            with refuse_remote_code():  # a GGUF holds no Python; files beside it must not bring any in
                tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
                if is_llama_moe(facts):
                    write_mixtral(gguf_path, tmp)
                else:
                    config = AutoConfig.from_pretrained(gguf_path.parent, **kw)
                    fix_config(config, facts)
                    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, config=config,
                                                                 dtype=torch.float32, **kw)
                    if getattr(model, "hf_quantizer", None) is not None:
                        model.hf_quantizer.remove_quantization_config(model)
                    model.save_pretrained(tmp, safe_serialization=True)
                    del model  # the check loads each engine in turn: never two copies of the weights
        except (*UNREADABLE, RuntimeError, TypeError) as e:  # RuntimeError: transformers' loader on a shape
            # mismatch; TypeError: its GGUF tokenizer converter on a vocabulary it cannot read
            raise _unreadable(gguf_path, e) from None
        before = tokenizer(CHECK_TEXT)["input_ids"]
        tokenizer.save_pretrained(tmp)
        if _gguf_tokenizer_model(gguf_path) == "gpt2":
            _fix_bpe_tokenizer(tmp, json.loads((tmp / "config.json").read_text()).get("eos_token_id"))
            after = AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)(CHECK_TEXT)["input_ids"]
            if after != before:
                raise RuntimeError("tokenizer fix changed token ids; refusing to write the import")
        agreement = verify_import(gguf_path, tmp)
        (tmp / "quantkit-import.json").write_text(json.dumps(
            {"source": str(gguf_path), "tokenizer_model": _gguf_tokenizer_model(gguf_path),
             "gguf_architecture": facts["arch"], "agreement": agreement}, indent=2))
        tmp.chmod(0o755)  # mkdtemp makes it private; the import is a normal shared directory
        if out_dir.exists():
            out_dir.rmdir()  # must be empty; rmdir refuses otherwise
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
