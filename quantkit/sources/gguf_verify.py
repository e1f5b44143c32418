"""An import that proves itself: the source GGUF scored in llama.cpp and the imported checkpoint scored in
transformers, on the very same token windows, must agree within AGREEMENT in perplexity.

Why: transformers' GGUF loader can be silently wrong for an architecture (a permuted or offset tensor, experts
dropped), and nothing downstream notices; a real-weights import scored ~43,000 where llama.cpp scored ~22 on
the same file. The windows are WikiText-2 test tokenized by the imported tokenizer (token ids are what both
engines score, so tokenizer differences cannot hide or cause a disagreement). The engines run one after the
other, each freed before the next loads, so two copies of the weights are never held.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from quantkit.errors import UserError

AGREEMENT = 0.01  # relative perplexity difference allowed between the two engines
SEQ_LEN, WINDOWS = 256, 4


def _fields(path: Path) -> dict:
    import struct

    from gguf import GGUFReader

    try:
        r = GGUFReader(str(path))
        arch = r.fields["general.architecture"].contents()
        facts = {"arch": arch}
        for key, name in FACTS.items():  # hyper-parameters the import needs and transformers' mapping drops
            field = r.fields.get(f"{arch}.{key}")
            facts[name] = field.contents() if field else None
    except (ValueError, KeyError, EOFError, IndexError, struct.error) as e:  # truncated or malformed
        raise UserError(f"cannot import {path}: {type(e).__name__}: {str(e)[:300]}",
                        fix="check the file (truncated download?)") from None
    facts["expert_count"] = int(facts["expert_count"] or 0)
    return facts


# GGUF key (after `<arch>.`) -> name in the facts
FACTS = {"expert_count": "expert_count", "attention.key_length": "head_dim", "block_count": "layers",
         "embedding_length": "hidden", "attention.head_count": "heads", "rope.freq_base_swa": "rope_theta_swa",
         "attn_logit_softcapping": "attn_softcap", "final_logit_softcapping": "final_softcap",
         "expert_feed_forward_length": "expert_ffn"}
# llama.cpp architecture names that transformers spells differently (its load_gguf_checkpoint renames them)
TRANSFORMERS_ARCH = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                     "minimax-m2": "minimax_m2"}


def preflight(gguf_path: Path) -> dict:
    """Refuse, in one line and before loading anything, an architecture the import cannot carry."""
    from quantkit.architectures import TABLE, unsupported
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    f = _fields(gguf_path)
    entry = next((a for a in TABLE if a.gguf_arch == f["arch"] and a.moe == (f["expert_count"] > 0)), None)
    why = unsupported(entry, "import-gguf") if entry else None
    if why is None and TRANSFORMERS_ARCH.get(f["arch"], f["arch"]) not in GGUF_SUPPORTED_ARCHITECTURES:
        why = f"transformers' GGUF loader has no mapping for llama.cpp architecture `{f['arch']}`"
    if why:
        name = entry.name if entry else f["arch"]
        raise UserError(f"import-gguf does not support {gguf_path.name} ({name}): {why}",
                        fix="convert from the original Hugging Face checkpoint instead")
    return f


def _score(engine_name: str, path: Path, entry: str, ids) -> tuple[float, dict]:
    from quantkit.evaluation.engines import get_engine

    engine = get_engine(engine_name)
    try:  # engines may open the file lazily, at the first score: both steps are the load
        handle = engine.load(path, entry, dtype="float32")
        nll, count = engine.nll(handle, ids, label="import check")
    except ImportError as e:
        raise UserError(f"import-gguf verifies the import in {engine_name}, which is not installed ({e})",
                        fix="run `make setup`") from None
    except (ValueError, RuntimeError) as e:  # e.g. llama.cpp refusing the file's vocabulary
        raise UserError(f"import-gguf cannot verify {(Path(path) / entry).name}: {engine_name} cannot load it ({str(e)[:200]})",
                        fix="convert from the original Hugging Face checkpoint instead") from None
    described = engine.describe(handle)
    del handle
    return math.exp(nll / count), described


def verify_import(gguf_path: Path, hf_dir: Path) -> dict:
    """Score both; return the agreement record, or raise UserError (the caller then writes nothing)."""
    from transformers import AutoTokenizer

    from quantkit.evaluation.perplexity import make_windows
    from quantkit.sources.resolve import TOKENIZER_FILES
    from quantkit.util import fingerprint_files

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    tok_fp = fingerprint_files([hf_dir / n for n in TOKENIZER_FILES if (hf_dir / n).exists()], hf_dir)
    windows = make_windows("wikitext2", tok, tok_fp, SEQ_LEN, WINDOWS)
    ppl_gguf, gguf_engine = _score("llama.cpp", gguf_path.parent, gguf_path.name, windows.ids)
    ppl_hf, hf_engine = _score("transformers", hf_dir, ".", windows.ids)
    rel = ppl_hf / ppl_gguf - 1
    record = {"llama_cpp_ppl": round(ppl_gguf, 4), "transformers_ppl": round(ppl_hf, 4),
              "relative_difference": round(rel, 6), "limit": AGREEMENT, "dataset": "wikitext2",
              "protocol": windows.meta["protocol"], "seq_len": SEQ_LEN, "windows": int(windows.ids.shape[0]),
              "dataset_sha256": windows.meta["dataset_sha256"], "versions": gguf_engine.get("versions", {}),
              "wall_s": round(time.perf_counter() - t0, 1)}
    if not math.isfinite(rel) or abs(rel) > AGREEMENT:
        raise UserError(f"import-gguf refused {gguf_path.name}: the imported checkpoint scores perplexity "
                        f"{ppl_hf:.2f} in transformers where llama.cpp scores the source GGUF {ppl_gguf:.2f} on the "
                        f"same {windows.ids.shape[0]}x{SEQ_LEN} WikiText-2 tokens ({rel:+.1%}, limit "
                        f"{AGREEMENT:.0%}); transformers' GGUF loader is wrong for this model",
                        fix="convert from the original Hugging Face checkpoint instead")
    return record
