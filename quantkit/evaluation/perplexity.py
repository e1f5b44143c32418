"""Perplexity protocols: which token windows are scored. Engines score them; this module fixes the windows.

Pinned protocols (GPTQ's datautils.py and its evaluation loop; text is tokenized as the reference does,
`tokenizer(text)`, i.e. with the tokenizer's default special tokens: BOS first for Llama-family tokenizers):
- `gptq-concat/2` (WikiText-2 and any other text): rows joined with "\\n\\n", tokenized once, cut into
  non-overlapping windows of seq_len; every token after the first of a window is scored.
- `gptq-c4/2` (C4 validation): seed 0, a random document longer than seq_len, a random window in it, 256 times.
(/1 tokenized without special tokens; the two agree only for tokenizers that add none, e.g. SmolLM2's.)
ppl = exp(mean NLL over all scored tokens). `max_windows` keeps the first N windows (bounds CPU cost).
The key of a measurement covers dataset bytes, tokenizer, protocol and window count, so a stored number is
reused only when it means the same thing; where the data was read from is recorded, never keyed.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from quantkit.calibration import TextSource, gptq_encoder, load_texts, sample_windows
from quantkit.util import cache_dir, sha256_json

C4_EVAL_WINDOWS = 256  # GPTQ's C4 evaluation uses 256 windows


@dataclass(frozen=True)
class ProtocolSpec:
    name: str
    dataset: str
    split: str
    sampled: bool  # True: GPTQ random windows; False: concatenated text cut into windows


PROTOCOLS = {
    "wikitext2": ProtocolSpec("gptq-concat/2", "wikitext2", "test", sampled=False),
    "c4": ProtocolSpec("gptq-c4/2", "c4", "validation", sampled=True),
}


def protocol_for(dataset: str) -> ProtocolSpec:
    return PROTOCOLS.get(dataset, ProtocolSpec("gptq-concat/2", dataset, "test", sampled=False))


@dataclass(frozen=True)
class EvalWindows:
    dataset: str
    key: str
    meta: dict
    ids: "object"  # torch.LongTensor [windows, seq_len]


def _describe(spec: ProtocolSpec, text: TextSource, tokenizer_fp: str, seq_len: int, max_windows: int | None):
    """(key, record): the key is content and settings only; `origin` (a path or hub URL) is provenance."""
    keyed = {"protocol": spec.name, "dataset": spec.dataset, "split": spec.split, "dataset_sha256": text.sha256,
             "tokenizer": tokenizer_fp, "seq_len": seq_len, "max_windows": max_windows,
             "special_tokens": "tokenizer default"}
    return sha256_json(keyed), {**keyed, "origin": text.origin}


def window_key(dataset: str, tokenizer_fp: str, seq_len: int, max_windows: int | None) -> str:
    spec = protocol_for(dataset)
    return _describe(spec, load_texts(spec.dataset, spec.split), tokenizer_fp, seq_len, max_windows)[0]


def make_windows(dataset: str, tokenizer, tokenizer_fp: str, seq_len: int, max_windows: int | None) -> EvalWindows:
    import torch
    from safetensors.torch import load_file, save_file

    spec = protocol_for(dataset)
    text = load_texts(spec.dataset, spec.split)
    key, meta = _describe(spec, text, tokenizer_fp, seq_len, max_windows)
    path = cache_dir("eval-windows") / f"{key}.safetensors"
    if path.exists():
        ids = load_file(path)["input_ids"]
    else:
        if spec.sampled:
            n = min(C4_EVAL_WINDOWS, max_windows or C4_EVAL_WINDOWS)
            ids = torch.tensor(sample_windows(text.docs, gptq_encoder(tokenizer), n, seq_len, seed=0),
                               dtype=torch.long)
        else:
            flat = gptq_encoder(tokenizer)("\n\n".join(text.docs))
            n = len(flat) // seq_len
            n = min(n, max_windows) if max_windows else n
            ids = torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)
        tmp = path.with_suffix(".tmp")
        save_file({"input_ids": ids.contiguous()}, tmp)
        tmp.replace(path)
    meta = {**meta, "windows": int(ids.shape[0]), "tokens_scored": int(ids.shape[0] * (seq_len - 1))}
    return EvalWindows(dataset, key, meta, ids)


def perplexity(engine, handle, windows: EvalWindows, batch_size: int = 1) -> dict:
    """Score windows with an engine; returns the metric record (the number and everything it depends on)."""
    t0 = time.perf_counter()
    nll_sum, count, window_nll = 0.0, 0, []
    # one engine call per batch, so each batch's mean NLL is kept: two artifacts scored on the same windows give
    # paired differences, hence a standard error for the ppl change (report.rows; windows choice in the README)
    for start in range(0, windows.ids.shape[0], batch_size):
        s, c = engine.nll(handle, windows.ids[start:start + batch_size], batch_size=batch_size,
                          label=windows.dataset)
        nll_sum, count = nll_sum + s, count + c
        window_nll.append(round(s / c, 6))
    mean = nll_sum / count
    return {"ppl": math.exp(mean), "nll_mean": mean, "key": windows.key, **windows.meta,
            **engine.describe(handle), "wall_s": round(time.perf_counter() - t0, 2),
            "window_nll": window_nll, "window_nll_batch": batch_size}
