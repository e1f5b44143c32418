"""Scoring token windows with llama.cpp's in-process binding, in this process or in a child that never imports
torch.

Why a child: on the H200 (docs/benchmarks/h200-x2/README.md, "Why import-gguf segfaults") the binding over a
CUDA build of llama.cpp segfaults while loading a BPE vocabulary whenever torch was imported first in the
process (GPUs visible or not): libllama's std::regex resolves a libstdc++ locale symbol into libggml-cuda.so.
Without torch the same call works. So where the build is CUDA and torch is loaded, the engine scores through
`ChildScorer`: one child process per open context (this module run with `-m`), fed token rows as JSON lines.
This module imports quantkit.toolchain.llama_cpp only (numpy later, inside functions; never torch): the child
stays clean.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from quantkit.toolchain import llama_cpp as toolchain

# numpy is imported inside the functions: the child loads llama.cpp's libraries before numpy's, the order of the
# one torch-free process proven to work on the GPU host (scripts/llama_binding_diag.py, H200 runs 4 and 5)

MARK = "quantkit-llama-score "  # prefix of the child's reply lines


def open_llama(model_path: Path | str, n_ctx: int, threads: int, n_gpu_layers: int):
    """A Llama keeping the logits of every position. Flash attention on, as llama-perplexity's `auto` resolves
    on CPU, so the two compute the same graph."""
    ll = toolchain.binding()
    from llama_cpp import _logger

    _logger.set_verbose(False)  # llama.cpp logs only errors to stderr
    return ll.Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(512, n_ctx),
                    n_threads=threads, n_threads_batch=threads, logits_all=True, flash_attn=True,
                    n_gpu_layers=n_gpu_layers, verbose=False)


def token_nll(logits, targets: list[int], rows_per_step: int = 128) -> float:
    """Sum of -log softmax(logits)[target], computed as llama.cpp does (float32 exp, float64 sum)."""
    import numpy as np

    total = 0.0
    for s in range(0, len(targets), rows_per_step):
        lg = logits[s:s + rows_per_step]
        tg = np.asarray(targets[s:s + rows_per_step])
        m = lg.max(axis=1)
        lse = np.log(np.exp(lg - m[:, None]).sum(axis=1, dtype=np.float64))
        total += float(np.sum(lse - (lg[np.arange(len(tg)), tg] - m).astype(np.float64)))
    return total


def score_row(llm, row: list[int]) -> float:
    """NLL of row[1:] given its prefixes, one window from an empty cache."""
    llm.reset()
    llm.eval(row)
    return token_nll(llm.scores[:len(row) - 1], row[1:])


# n_gpu_layers is the caller's decision, made where both the build and the device are known (the engine's
# _gpu_layers(): a CUDA build AND a visible CUDA device); `device` labels that decision, and a crashed GPU child's
# CPU restart relabels it.


class InProcessScorer:
    def __init__(self, model_path: Path, n_ctx: int, threads: int, n_gpu_layers: int):
        self.llm = open_llama(model_path, n_ctx, threads, n_gpu_layers)
        self.device = "cuda" if n_gpu_layers else "cpu"
        self.fallback_reason = None

    def score(self, row: list[int]) -> float:
        return score_row(self.llm, row)

    def close(self) -> None:
        self.llm = None


class ChildScorer:
    """The same scoring in a child interpreter that imports no torch; one JSON line per row each way.

    A child that dies of a signal with the model on the GPU (H200 run 5: SIGSEGV, cause not yet known) is started
    once more with the GPUs hidden and the model on the CPU, and the row is scored again: the numbers are the same
    computation, `device` says where it ran, and the log says why."""

    def __init__(self, model_path: Path, n_ctx: int, threads: int, n_gpu_layers: int):
        self.args = (str(model_path), str(n_ctx), str(threads))
        self.device = "cuda" if n_gpu_layers else "cpu"
        self.fallback_reason = None
        self._start(n_gpu_layers)

    def _start(self, n_gpu_layers: int) -> None:
        root = str(Path(__file__).resolve().parents[2])  # the quantkit this process runs
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
        if self.fallback_reason:
            env["CUDA_VISIBLE_DEVICES"] = ""
        # faulthandler: a crash prints the child's Python stack on its stderr (the build log)
        self.proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "quantkit.toolchain.llama_cpp_scorer",
                                      *self.args, str(n_gpu_layers)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        reply = self._read()
        if reply is None:
            return self._restart_on_cpu()
        self.torch_in_child = reply["torch_loaded"]

    def _read(self) -> dict | None:
        """The child's next reply; None once it has exited."""
        while line := self.proc.stdout.readline():
            if line.startswith(MARK):  # anything else on the child's stdout is the library talking
                return json.loads(line[len(MARK):])
        self.proc.wait()
        return None

    def _restart_on_cpu(self) -> None:
        code = self.proc.returncode
        if code >= 0 or self.device == "cpu":
            raise RuntimeError(f"llama.cpp scoring process exited {code} (its stderr is above)")
        self.fallback_reason = f"the scoring process died of signal {-code} with the model on the GPU"
        print(f"llama.cpp: {self.fallback_reason}; scoring on the CPU instead", file=sys.stderr, flush=True)
        self.device = "cpu"
        self._start(0)

    def score(self, row: list[int]) -> float:
        for _ in range(2):
            try:
                self.proc.stdin.write(json.dumps(row) + "\n")
                self.proc.stdin.flush()
                reply = self._read()
            except BrokenPipeError:
                self.proc.wait()
                reply = None
            if reply is not None:
                return reply["nll"]
            self._restart_on_cpu()
        raise AssertionError("unreachable: the CPU restart raises or scores")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # EOF: the child leaves its loop and exits
            self.proc.wait(timeout=60)

    def __del__(self):  # a handle dropped without close() (gguf_verify deletes its handle) takes its child along
        try:
            self.close()
        except Exception:
            pass


def needs_child() -> bool:
    """A CUDA build in a process where torch is loaded (the crash above); QUANTKIT_LLAMA_CPP_CHILD=1|0 forces."""
    forced = os.environ.get("QUANTKIT_LLAMA_CPP_CHILD")
    if forced in ("0", "1"):
        return forced == "1"
    return "torch" in sys.modules and toolchain.backend_of(toolchain.find_tool("llama-bench")) == "cuda"


def open_scorer(model_path: Path, n_ctx: int, threads: int, n_gpu_layers: int):
    cls = ChildScorer if needs_child() else InProcessScorer
    return cls(model_path, n_ctx, threads, n_gpu_layers)


def _child_main(argv: list[str]) -> int:
    model_path, n_ctx, threads, ngl = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    llm = open_llama(model_path, n_ctx, threads, ngl)
    out = sys.stdout
    out.write(MARK + json.dumps({"torch_loaded": "torch" in sys.modules}) + "\n")
    out.flush()
    for line in sys.stdin:
        out.write(MARK + json.dumps({"nll": score_row(llm, json.loads(line))}) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
