"""`llama-perplexity`: llama.cpp's own perplexity protocol on WikiText-2 (its wiki.test.raw), by the tool itself.
An additional metric next to the common protocol: it is what llama.cpp's published tables quote, so a GGUF
row can be checked against them."""
from __future__ import annotations

from quantkit.evaluation.checks import Subject, register_check


def llama_cpp_eval_text() -> tuple[str, dict]:
    """WikiText-2 test as llama.cpp's tables use it (wiki.test.raw): HF rows with blank lines restored."""
    from quantkit.calibration import load_texts
    from quantkit.util import sha256_json

    src = load_texts("wikitext2", "test")
    text = "".join(d or " \n" for d in src.docs)
    return text, {"dataset": "wikitext2", "split": "test", "file": "wiki.test.raw", "origin": src.origin,
                  "dataset_sha256": src.sha256, "text_sha256": sha256_json(text)}


@register_check("llama-perplexity")
def llama_perplexity_check(subject: Subject, *, n_ctx: int = 512, chunks: int | None = None,
                           threads: int | None = None) -> dict:
    from quantkit.evaluation.engines.llama_cpp_engine import llama_perplexity

    text, meta = llama_cpp_eval_text()
    text_file = subject.ctx.workdir / "wiki.test.raw"
    if not text_file.exists():
        text_file.write_text(text)
    rec = llama_perplexity(subject.path / subject.entry, text_file, n_ctx, chunks, threads)
    return {**rec, **meta, "summary": f"ppl {rec['ppl']:.4f} ({rec['chunks']} x {rec['n_ctx']} tokens, "
                                      f"llama.cpp protocol)"}
