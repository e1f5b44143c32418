"""`perplexity-agrees`: the artifact's perplexity, measured by its own engine from its files, equals a number
the format recorded while producing it (e.g. the quantizer's fake-quantized model) on the same windows. This
proves the written bytes, not only the in-memory quantization."""
from __future__ import annotations

import math

from quantkit.errors import UserError
from quantkit.evaluation.checks import Subject, register_check


@register_check("perplexity-agrees")
def perplexity_agrees(subject: Subject, *, expected_ppl: float, rel_tol: float, reference: str, dataset: str,
                      seq_len: int, max_windows: int | None, key: str, **_facts) -> dict:
    rec = subject.metrics.get("perplexity", {}).get(dataset)
    if not rec or rec.get("key") != key:  # the recipe measured other windows (or none): measure these
        from quantkit.evaluation.engines import get_engine
        from quantkit.evaluation.perplexity import make_windows, perplexity
        from quantkit.evaluation.run import _load

        ctx = subject.ctx
        engine = get_engine(subject.engine)
        handle = _load(ctx, engine, subject.path, subject.entry)  # the recipe's remote-code switch holds here too
        windows = make_windows(dataset, ctx.tokenizer, ctx.tokenizer_fingerprint, seq_len, max_windows)
        ppl = ctx.recipe.eval.perplexity
        rec = perplexity(engine, handle, windows, batch_size=ppl.batch_size if ppl else 1)
        del handle
    got = round(rec["ppl"], 4)
    rel = got / expected_ppl - 1
    out = {"ppl": got, "engine": subject.engine, "expected_ppl": expected_ppl, "reference": reference,
           "relative_difference": round(rel, 6), "rel_tol": rel_tol, "dataset": dataset, "key": key,
           "summary": f"{subject.engine} ppl {got:.4f} vs {reference} {expected_ppl:.4f} ({rel:+.3%})"}
    if not math.isfinite(rel) or abs(rel) > rel_tol:
        raise UserError(f"decoded artifact ppl {got:.4f} ({subject.engine}) differs from {reference} ppl "
                        f"{expected_ppl:.4f} by {rel:+.2%} (limit {rel_tol:.1%})")
    return out
