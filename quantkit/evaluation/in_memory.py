"""Perplexity of a model object that exists only inside a format's `produce` (e.g. ModelOpt's fake-quantized
model, destroyed by its own export), on the windows the build scores. Offered to formats as
`BuildContext.score_in_memory`, so a format never imports evaluation code; the number it gets is what a
`perplexity-agrees` check later compares the exported artifact with."""
from __future__ import annotations

from quantkit.util import cpu_threads


def verification_spec(recipe) -> tuple[str, int, int | None]:
    """The first perplexity dataset of the recipe with its settings (the windows the build itself scores)."""
    ppl = recipe.eval.perplexity
    return (ppl.datasets[0], ppl.seq_len, ppl.max_windows) if ppl else ("wikitext2", 512, 8)


def score_in_memory(ctx, model) -> dict:
    import torch

    from quantkit.evaluation.engines.transformers_engine import Loaded, TransformersEngine
    from quantkit.evaluation.perplexity import make_windows, perplexity, window_key

    dataset, seq_len, max_windows = verification_spec(ctx.recipe)
    windows = make_windows(dataset, ctx.tokenizer, ctx.tokenizer_fingerprint, seq_len, max_windows)
    torch.set_num_threads(cpu_threads())
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    batch = ctx.recipe.eval.perplexity.batch_size if ctx.recipe.eval.perplexity else 1
    rec = perplexity(TransformersEngine(), Loaded(model, str(model.device), dtype), windows, batch)
    return {"ppl": round(rec["ppl"], 4), "dataset": dataset, "seq_len": seq_len, "max_windows": max_windows,
            "windows": rec["windows"], "protocol": rec["protocol"],
            "key": window_key(dataset, ctx.tokenizer_fingerprint, seq_len, max_windows)}
