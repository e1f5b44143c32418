"""The llama.cpp engine: GGUF files measured by llama.cpp's own tools, from the one cached build
(quantkit.toolchain.llama_cpp; a CUDA build offloads every layer, `-ngl 99`, when this process sees a CUDA device,
else runs on the CPU with `-ngl 0` and the records say cpu and why).

- `throughput`: `llama-bench -o json` (pp{prompt_len} and tg{gen_len}, the recipe's repetitions and threads).
- `llama_perplexity`: llama.cpp's own perplexity protocol, `llama-perplexity -f FILE -c N --chunks K` (its
  tokenization, BOS per chunk, second half of each chunk scored): the number llama.cpp's tables quote.
- `nll`: the common protocol, the only use of the binding. It must score exactly the token ids and windows every
  other engine scores (the cross-engine check), and no llama.cpp tool takes token ids. In this process, or in a
  child without torch where a CUDA build crashes beside torch (quantkit/toolchain/llama_cpp_scorer.py).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.evaluation.engines import register_engine
from quantkit.evaluation.latency import ttft_summary
from quantkit.toolchain import llama_cpp as toolchain
from quantkit.toolchain.gguf_file import gguf_summary
from quantkit.toolchain.llama_cpp import default_threads
from quantkit.toolchain.llama_cpp_scorer import open_scorer
from quantkit.util import library_versions

LLAMA_CPP_PROTOCOL = "llama.cpp-perplexity/1"


def _offload() -> tuple[int, str | None]:
    """(GPU layers, why the CPU where a CUDA build runs there). All layers on the GPU with a CUDA build and a visible
    CUDA device (llama-bench's -ngl 99); none otherwise: a CUDA build with no device falls back to the CPU by itself,
    so the build alone would label CPU numbers cuda."""
    if toolchain.backend_of(toolchain.find_tool("llama-bench")) != "cuda":
        return 0, None
    if not toolchain.cuda_device_visible():
        return 0, "llama.cpp CUDA build, no CUDA device visible"
    return 99, None


def _gpu_layers() -> int:
    return _offload()[0]


def _device_fields() -> dict:
    ngl, why = _offload()
    return {"device": "cuda" if ngl else "cpu", **({"device_note": why} if why else {})}


@dataclass
class Loaded:
    path: Path
    threads: int
    scorers: dict = field(default_factory=dict)  # n_ctx -> scorer: the context is sized by the window length
    scored_on: dict = field(default_factory=dict)  # where the last windows were scored (a crashed GPU child: cpu)

    def scorer(self, n_ctx: int):
        """In this process, or in a child without torch where the CUDA build crashes beside it
        (quantkit/toolchain/llama_cpp_scorer.py)."""
        if n_ctx not in self.scorers:
            self.close()  # one context at a time: each holds n_ctx x vocab logits
            self.scorers[n_ctx] = open_scorer(self.path, n_ctx, self.threads, _gpu_layers())
        return self.scorers[n_ctx]

    def close(self) -> None:
        for s in self.scorers.values():
            s.close()
        self.scorers.clear()


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
        scorer = handle.scorer(length)
        total, count = 0.0, 0
        with Progress(transient=True) as bar:
            task = bar.add_task(f"perplexity {label} (llama.cpp)", total=n)
            for row in ids.tolist():
                total += scorer.score(row)
                count += length - 1
                bar.advance(task)
        handle.scored_on = {"device": scorer.device,
                            **({"fallback": scorer.fallback_reason} if scorer.fallback_reason else {})}
        return total, count

    def throughput(self, handle: Loaded, spec) -> dict:
        """`llama-bench -o json` at the recipe's prompt and generation lengths; batch 1 only (llama-bench runs
        one sequence), other batch sizes are listed as skipped."""
        threads = spec.threads or handle.threads
        handle.close()  # free the perplexity context first: its logits are large
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
        # describe() carries the device_note (why the CPU) where a CUDA build sees no device
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
        return {"engine": "llama.cpp", **_device_fields(), **handle.scored_on,
                "dtype": gguf_summary(handle.path).file_type(), "threads": handle.threads,
                # the sdist's vendored llama.cpp has no git metadata (llama-bench says commit "unknown"): the pin is
                # the version
                "versions": {**library_versions(),
                             "llama.cpp": f"vendored in llama-cpp-python {toolchain.LLAMA_CPP_PYTHON_VERSION}"}}


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
