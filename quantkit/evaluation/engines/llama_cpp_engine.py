"""The llama.cpp engine: loads a .gguf with llama-cpp-python (the same pinned llama.cpp as the CLI tools).

Three measurements, each with the semantics of a reference so numbers compare:
- `nll`: the common protocol. The same token ids and windows as the transformers engine, every token after
  the first of a window scored, so GGUF rows sit in one table with every other format.
- `llama_cpp_perplexity`: llama.cpp's own protocol, as `llama-perplexity -f FILE -c N` computes it (text
  tokenized by llama.cpp, BOS replacing each chunk's first token when the vocab adds BOS, only the second half
  of each chunk scored). Its final estimate is what llama.cpp's published tables quote.
- `bench`: llama-bench semantics for pp (one prompt of N random tokens, n_batch 2048 / n_ubatch 512) and tg
  (N single-token decodes from an empty cache): one warmup, then `reps` timed runs, mean and stddev of tok/s.
"""
from __future__ import annotations

import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantkit.evaluation.engines import register_engine
from quantkit.evaluation.latency import ttft_summary
from quantkit.util import library_versions

LLAMA_CPP_PROTOCOL = "llama.cpp-perplexity/1"


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _quiet() -> None:
    from llama_cpp import _logger

    _logger.set_verbose(False)  # llama.cpp logs only errors to stderr


def open_llama(model_path: Path | str, n_ctx: int, threads: int):
    """A Llama keeping the logits of every position. Flash attention on, as llama-perplexity's `auto` resolves
    on CPU, so the two compute the same graph."""
    from llama_cpp import Llama

    _quiet()
    return Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(512, n_ctx),
                 n_threads=threads, n_threads_batch=threads, logits_all=True, flash_attn=True, verbose=False)


def token_nll(logits: np.ndarray, targets: list[int], rows_per_step: int = 128) -> float:
    """Sum of -log softmax(logits)[target], computed as llama.cpp does (float32 exp, float64 sum)."""
    total = 0.0
    for s in range(0, len(targets), rows_per_step):
        lg = logits[s:s + rows_per_step]
        tg = np.asarray(targets[s:s + rows_per_step])
        m = lg.max(axis=1)
        lse = np.log(np.exp(lg - m[:, None]).sum(axis=1, dtype=np.float64))
        total += float(np.sum(lse - (lg[np.arange(len(tg)), tg] - m).astype(np.float64)))
    return total


@dataclass
class Loaded:
    path: Path
    threads: int
    llamas: dict = field(default_factory=dict)  # n_ctx -> Llama: the context is sized by the window length

    def llama(self, n_ctx: int):
        if n_ctx not in self.llamas:
            self.llamas.clear()  # one context at a time: each holds n_ctx x vocab logits
            self.llamas[n_ctx] = open_llama(self.path, n_ctx, self.threads)
        return self.llamas[n_ctx]


@register_engine
class LlamaCppEngine:
    name = "llama.cpp"

    def load(self, path: Path, entry: str = ".", dtype: str = "auto", trust_remote_code: bool = False) -> Loaded:
        # a GGUF file holds no Python: nothing to trust (the flag is accepted like every engine's)
        p = Path(path) / entry
        if not p.is_file():
            raise FileNotFoundError(f"no GGUF file at {p}")
        return Loaded(p, default_threads())  # dtype: a GGUF's types are in the file

    def nll(self, handle: Loaded, ids, batch_size: int = 1, label: str = "") -> tuple[float, int]:
        from rich.progress import Progress

        n, length = ids.shape
        llm = handle.llama(length)
        total, count = 0.0, 0
        with Progress(transient=True) as bar:
            task = bar.add_task(f"perplexity {label} (llama.cpp)", total=n)
            for row in ids.tolist():
                llm.reset()
                llm.eval(row)
                total += token_nll(llm.scores[:length - 1], row[1:])
                count += length - 1
                bar.advance(task)
        return total, count

    def throughput(self, handle: Loaded, spec) -> dict:
        """The orchestrator's throughput record (recipe eval.throughput); batch sizes other than 1 are skipped."""
        from quantkit.util import StagePeak

        threads = spec.threads or handle.threads
        handle.llamas.clear()  # free the perplexity context first: its logits are large
        with StagePeak() as rss:
            one = recipe_throughput(handle.path, spec, threads)
        return {**self.describe(handle), "threads": threads, "serving_engine": True, "batches": {"1": one},
                "batch_sizes_skipped": [b for b in spec.batch_sizes if b != 1],
                "peak_memory_mb": round(rss.peak, 1), "peak_memory_kind": "rss", "prompt_len": spec.prompt_len,
                "gen_len": spec.gen_len, "repetitions": spec.repetitions, "warmup": spec.warmup}

    def describe(self, handle: Loaded) -> dict:
        return {"engine": "llama.cpp", "device": "cpu", "dtype": gguf_file_type(handle.path),
                "threads": handle.threads, "versions": library_versions()}


def gguf_file_type(path: Path) -> str:
    import gguf

    r = gguf.GGUFReader(str(path))
    f = r.fields.get("general.file_type")
    if f is None:
        return "unknown"
    try:
        return gguf.LlamaFileType(int(f.contents())).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return str(f.contents())


def llama_cpp_perplexity(model_path: Path | str, text: str, n_ctx: int = 512, max_chunks: int | None = None,
                         threads: int | None = None) -> dict:
    """llama-perplexity's `perplexity()` (tools/perplexity/perplexity.cpp) re-done in Python; the result equals
    `llama-perplexity -m MODEL -f FILE -c n_ctx [--chunks max_chunks]`'s final estimate."""
    import llama_cpp

    t0 = time.perf_counter()
    llm = open_llama(model_path, n_ctx, threads or default_threads())
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    bos = llama_cpp.llama_vocab_bos(vocab)
    # common_tokenize(ctx, text, add_special=true, parse_special=false)
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    if len(tokens) < 2 * n_ctx:
        raise ValueError(f"text has {len(tokens)} tokens; llama-perplexity needs at least {2 * n_ctx}")
    n_chunk = len(tokens) // n_ctx
    if max_chunks is not None:
        n_chunk = min(n_chunk, max_chunks)
    first = n_ctx // 2  # logits of positions first..n_ctx-2 score tokens first+1..n_ctx-1
    nll, count = 0.0, 0
    for i in range(n_chunk):
        chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        targets = chunk[first + 1:]
        if add_bos:
            chunk[0] = bos
        llm.reset()
        llm.eval(chunk)
        nll += token_nll(llm.scores[first:n_ctx - 1], targets)
        count += n_ctx - 1 - first
    del llm
    return {"ppl": math.exp(nll / count), "nll_mean": nll / count, "protocol": LLAMA_CPP_PROTOCOL,
            "description": f"llama-perplexity -c {n_ctx}: llama.cpp tokenization, BOS per chunk if the vocab "
                           f"adds BOS ({add_bos}), second half of each {n_ctx}-token chunk scored",
            "n_ctx": n_ctx, "chunks": n_chunk, "chunks_available": len(tokens) // n_ctx,
            "tokens_scored": count, "wall_s": round(time.perf_counter() - t0, 2)}


class _Runner:
    """Raw libllama calls as llama-bench makes them (no Python-side logits copies): model, contexts, decodes."""

    def __init__(self, model_path: Path | str, threads: int):
        import llama_cpp

        _quiet()
        self.ll, self.threads, self.rng = llama_cpp, threads, random.Random(0)
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(model_path).encode(),
                                                          llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.bos = llama_cpp.llama_vocab_bos(vocab) if llama_cpp.llama_vocab_get_add_bos(vocab) else None

    def context(self, n_ctx: int):
        cp = self.ll.llama_context_default_params()  # llama-bench's defaults: flash attention auto, f16 KV
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, 2048, 512
        ctx = self.ll.llama_init_from_model(self.model, cp)
        self.ll.llama_set_n_threads(ctx, self.threads, self.threads)
        return ctx

    def clear(self, ctx) -> None:
        self.ll.llama_memory_clear(self.ll.llama_get_memory(ctx), False)

    def _tok(self) -> int:
        return self.rng.randrange(self.n_vocab)

    def _decode(self, ctx, toks: list[int]) -> None:
        arr = (self.ll.llama_token * len(toks))(*toks)
        if self.ll.llama_decode(ctx, self.ll.llama_batch_get_one(arr, len(toks))) != 0:
            raise RuntimeError("llama_decode failed")

    def prompt(self, ctx, n: int) -> None:  # test_prompt: one batch (n_batch 2048 >= n), BOS first if added
        first = self.bos if self.bos is not None else self._tok()
        self._decode(ctx, [first] + [self._tok() for _ in range(n - 1)])
        self.ll.llama_synchronize(ctx)

    def gen(self, ctx, n: int, first: bool = True) -> None:  # test_gen: n single-token decodes, synced each
        tok = self.bos if first and self.bos is not None else self._tok()
        for _ in range(n):
            self._decode(ctx, [tok])
            self.ll.llama_synchronize(ctx)
            tok = self._tok()

    def free(self, ctx=None) -> None:
        if ctx is not None:
            self.ll.llama_free(ctx)
        else:
            self.ll.llama_model_free(self.model)


def bench(model_path: Path | str, n_prompt: int = 512, n_gen: int = 128, reps: int = 5,
          threads: int | None = None) -> dict:
    """pp{n_prompt} and tg{n_gen} tok/s with llama-bench's procedure (tools/llama-bench/llama-bench.cpp:
    context params as its defaults, fresh context per test, warmup, memory cleared before each rep)."""
    threads = threads or default_threads()
    r = _Runner(model_path, threads)

    def run(kind: str, n: int) -> dict:
        ctx = r.context(n)
        fn = r.prompt if kind == "pp" else r.gen
        fn(ctx, n if kind == "pp" else 1)  # warmup, as llama-bench (its gen warmup is one token)
        samples = []
        for _ in range(reps):
            r.clear(ctx)
            t = time.perf_counter_ns()
            fn(ctx, n)
            samples.append(n / ((time.perf_counter_ns() - t) / 1e9))
        r.free(ctx)
        return {"test": f"{kind}{n}", "n_tokens": n, "avg_ts": statistics.fmean(samples),
                "stddev_ts": statistics.stdev(samples) if len(samples) > 1 else 0.0, "samples_ts": samples}

    try:
        out = {"pp": run("pp", n_prompt), "tg": run("tg", n_gen)}
    finally:
        r.free()
    return {**out, "reps": reps, "threads": threads, "n_batch": 2048, "n_ubatch": 512,
            "method": "in-process llama_cpp (llama-bench procedure)"}


def recipe_throughput(model_path: Path | str, spec, threads: int) -> dict:
    """The recipe's throughput protocol (as the transformers engine): prefill of prompt_len random tokens
    (= time to first token), then gen_len - 1 decode steps after it; median over repetitions after warmup.
    Batch 1 only: one sequence per context here."""
    r = _Runner(model_path, threads)
    ctx = r.context(spec.prompt_len + spec.gen_len)
    ttft, prefill, decode = [], [], []
    try:
        for rep in range(spec.warmup + spec.repetitions):
            r.clear(ctx)
            t0 = time.perf_counter()
            r.prompt(ctx, spec.prompt_len)
            t1 = time.perf_counter()
            r.gen(ctx, spec.gen_len - 1, first=False)
            t2 = time.perf_counter()
            if rep >= spec.warmup:
                ttft.append(t1 - t0)
                prefill.append(spec.prompt_len / (t1 - t0))
                decode.append((spec.gen_len - 1) / (t2 - t1))
    finally:
        r.free(ctx)
        r.free()
    return {"prefill_tok_s": round(statistics.median(prefill), 1), "decode_tok_s": round(statistics.median(decode), 2),
            **ttft_summary(ttft)}
