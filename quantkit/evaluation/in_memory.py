"""Perplexity of a model object that exists only inside a format's `produce` (e.g. ModelOpt's fake-quantized
model, destroyed by its own export), on the windows the build scores. Offered to formats as
`BuildContext.score_in_memory`, so a format never imports evaluation code; the number it gets is what a
`perplexity-agrees` check later compares the exported artifact with."""
from __future__ import annotations

import contextlib

from quantkit.util import cpu_threads


def verification_spec(recipe) -> tuple[str, int, int | None]:
    """The first perplexity dataset of the recipe with its settings (the windows the build itself scores)."""
    ppl = recipe.eval.perplexity
    return (ppl.datasets[0], ppl.seq_len, ppl.max_windows) if ppl else ("wikitext2", 512, 8)


@contextlib.contextmanager
def float32_on_cpu(model):
    """On the CPU the engines score 16-bit checkpoints in float32 (transformers_engine.load), so an in-memory model
    is scored in float32 there too, or an agreement check would compare bf16 arithmetic with float32 (ModelOpt FP8
    on the bf16 demo: -1.4 %). Each 16-bit parameter and buffer is widened and narrowed back afterwards (exact);
    a parameter keeps its stored dtype as `quantkit_stored_dtype` (what an exporter will write it from)."""
    import torch

    narrow = [t for t in (*model.parameters(), *model.buffers()) if t.dtype in (torch.bfloat16, torch.float16)]
    if not narrow or next(model.parameters()).device.type != "cpu":
        yield
        return
    kept = [(t, t.dtype) for t in narrow]
    for t, dtype in kept:
        if isinstance(t, torch.nn.Parameter):
            t.quantkit_stored_dtype = dtype
        t.data = t.data.float()
    try:
        yield
    finally:
        for t, dtype in kept:
            t.data = t.data.to(dtype)
            if isinstance(t, torch.nn.Parameter):
                del t.quantkit_stored_dtype


def score_in_memory(ctx, model) -> dict:
    import torch

    from quantkit.evaluation.engines.transformers_engine import Loaded, TransformersEngine
    from quantkit.evaluation.perplexity import make_windows, perplexity, window_key

    dataset, seq_len, max_windows = verification_spec(ctx.recipe)
    windows = make_windows(dataset, ctx.tokenizer, ctx.tokenizer_fingerprint, seq_len, max_windows)
    torch.set_num_threads(cpu_threads())
    batch = ctx.recipe.eval.perplexity.batch_size if ctx.recipe.eval.perplexity else 1
    with float32_on_cpu(model):
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        rec = perplexity(TransformersEngine(), Loaded(model, str(model.device), dtype), windows, batch)
    return {"ppl": round(rec["ppl"], 4), "dataset": dataset, "seq_len": seq_len, "max_windows": max_windows,
            "windows": rec["windows"], "protocol": rec["protocol"],
            "key": window_key(dataset, ctx.tokenizer_fingerprint, seq_len, max_windows)}
