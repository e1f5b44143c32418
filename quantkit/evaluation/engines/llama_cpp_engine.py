"""The llama.cpp engine: GGUF files measured by llama.cpp's own tools, from the one cached build
(quantkit.toolchain.llama_cpp; a CUDA build on a GPU host offloads every layer, `-ngl 99`).

- `throughput`: `llama-bench -o json` (pp{prompt_len} and tg{gen_len}, the recipe's repetitions and threads).
- `llama_perplexity`: llama.cpp's own perplexity protocol, `llama-perplexity -f FILE -c N --chunks K` (its
  tokenization, BOS per chunk, second half of each chunk scored): the number llama.cpp's tables quote.
- `nll`: the common protocol, the only in-process use of the binding. It must score exactly the token ids and
  windows every other engine scores (the cross-engine check), and no llama.cpp tool takes token ids.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantkit.evaluation.engines import register_engine
from quantkit.evaluation.latency import ttft_summary
from quantkit.toolchain import llama_cpp as toolchain
from quantkit.toolchain.llama_cpp import default_threads
from quantkit.util import library_versions

LLAMA_CPP_PROTOCOL = "llama.cpp-perplexity/1"


def _gpu_layers() -> int:
    """All layers on the GPU with a CUDA build (llama-bench's -ngl 99), none with a CPU build."""
    return 99 if toolchain.backend_of(toolchain.find_tool("llama-bench")) == "cuda" else 0


def open_llama(model_path: Path | str, n_ctx: int, threads: int):
    """A Llama keeping the logits of every position. Flash attention on, as llama-perplexity's `auto` resolves
    on CPU, so the two compute the same graph."""
    ll = toolchain.binding()
    from llama_cpp import _logger

    _logger.set_verbose(False)  # llama.cpp logs only errors to stderr
    return ll.Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(512, n_ctx),
                    n_threads=threads, n_threads_batch=threads, logits_all=True, flash_attn=True,
                    n_gpu_layers=_gpu_layers(), verbose=False)


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


def build_info() -> dict:
    """Which llama.cpp build the tools come from: backend, cache key, CMake options."""
    bench = toolchain.find_tool("llama-bench")
    opts = bench.parent.parent / "cmake-options.txt"
    return {"backend": toolchain.backend_of(bench), "dir": bench.parent.parent.name,
            "cmake_options": opts.read_text().split() if opts.is_file() else None}


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
        """`llama-bench -o json` at the recipe's prompt and generation lengths; batch 1 only (llama-bench runs
        one sequence), other batch sizes are listed as skipped."""
        threads = spec.threads or handle.threads
        handle.llamas.clear()  # free the perplexity context first: its logits are large
        ngl = _gpu_layers()
        args = ["-m", handle.path, "-p", spec.prompt_len, "-n", spec.gen_len, "-r", spec.repetitions,
                "-t", threads, "-ngl", ngl, "-o", "json"] + (["--no-warmup"] if spec.warmup == 0 else [])
        proc = toolchain.run_tool("llama-bench", args)
        tests = json.loads(proc.stdout)
        pp = next(t for t in tests if t["n_prompt"] and not t["n_gen"])
        tg = next(t for t in tests if t["n_gen"] and not t["n_prompt"])
        one = {"prefill_tok_s": round(pp["avg_ts"], 1), "decode_tok_s": round(tg["avg_ts"], 2),
               # llama-bench's pp test is the prompt alone: its time is the time to first token
               **ttft_summary([spec.prompt_len / t for t in pp.get("samples_ts") or [pp["avg_ts"]]]),
               "prefill_stddev_tok_s": round(pp["stddev_ts"], 1), "decode_stddev_tok_s": round(tg["stddev_ts"], 2),
               "prefill_samples_tok_s": pp.get("samples_ts"), "decode_samples_tok_s": tg.get("samples_ts")}
        device = f"cuda:{pp['gpu_info']}" if ngl and pp.get("gpu_info") else "cpu"
        return {**self.describe(handle), "device": device, "tool": "llama-bench", "threads": pp["n_threads"],
                "kernels": pp.get("backends"), "cpu_info": pp.get("cpu_info"), "n_gpu_layers": ngl,
                "build": {**build_info(), "commit": pp["build_commit"], "number": pp["build_number"]},
                "serving_engine": True, "batches": {"1": one},
                "batch_sizes_skipped": [b for b in spec.batch_sizes if b != 1],
                "peak_memory_mb": round(proc.peak_rss_mb, 1), "peak_memory_kind": "rss (llama-bench process)",
                "protocol": f"llama-bench pp{spec.prompt_len} tg{spec.gen_len} (tg from an empty context)",
                "prompt_len": spec.prompt_len, "gen_len": spec.gen_len, "repetitions": spec.repetitions,
                "warmup": min(spec.warmup, 1), "flash_attn": pp.get("flash_attn"), "n_batch": pp["n_batch"],
                "n_ubatch": pp["n_ubatch"]}

    def describe(self, handle: Loaded) -> dict:
        return {"engine": "llama.cpp", "device": "cuda" if _gpu_layers() else "cpu",
                "dtype": gguf_file_type(handle.path), "threads": handle.threads,
                # the sdist's vendored llama.cpp has no git metadata (llama-bench says commit "unknown"): the pin is
                # the version
                "versions": {**library_versions(),
                             "llama.cpp": f"vendored in llama-cpp-python {toolchain.LLAMA_CPP_PYTHON_VERSION}"}}


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


def llama_perplexity(model_path: Path | str, text_file: Path, n_ctx: int = 512, chunks: int | None = None,
                     threads: int | None = None) -> dict:
    """`llama-perplexity -m MODEL -f FILE -c n_ctx [--chunks K]`: its final estimate and what it scored."""
    threads = threads or default_threads()
    args = ["-m", model_path, "-f", text_file, "-c", n_ctx, "-t", threads, "-ngl", _gpu_layers()]
    if chunks:
        args += ["--chunks", chunks]
    proc = toolchain.run_tool("llama-perplexity", args)
    log = proc.stdout + proc.stderr
    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
    over = re.search(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)", log)
    if not final or not over:
        raise RuntimeError(f"llama-perplexity printed no final estimate:\n{log[-1500:]}")
    n_chunk, ctx = int(over.group(1)), int(over.group(2))
    return {"ppl": float(final.group(1)), "ppl_stderr": float(final.group(2)), "protocol": LLAMA_CPP_PROTOCOL,
            "tool": "llama-perplexity", "n_ctx": ctx, "chunks": n_chunk, "threads": threads,
            "tokens_scored": n_chunk * (ctx - 1 - ctx // 2), "peak_memory_mb": round(proc.peak_rss_mb, 1),
            "description": f"llama-perplexity -c {ctx}: llama.cpp tokenization, BOS per chunk if the vocab adds "
                           f"BOS, second half of each {ctx}-token chunk scored"}
