"""Where does llama.cpp's in-process binding crash on the GPU host? (run 3: `quantkit model import-gguf`
segfaulted there, with and without the GPUs visible, and left no Python traceback.)

    python3 -X faulthandler scripts/llama_binding_diag.py GGUF [--torch-first] [--windows 2 --seq-len 64]

Steps, each printed before it runs (so the last line before a crash names it): import quantkit's llama.cpp
toolchain, which library directory the binding loads, optionally import torch and initialise CUDA first (as the
import does: transformers has loaded torch's CUDA libraries before llama.cpp's), load the GGUF through the same
engine code the import's check uses (quantkit.evaluation.engines.llama_cpp_engine), score random token windows.
Run it under `-X faulthandler` (Python stack on SIGSEGV) or `cuda-gdb -batch -ex run -ex bt --args python3 ...`
(native stack).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def step(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--torch-first", action="store_true", help="import torch and initialise CUDA first")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--n-vocab", type=int, default=None, help="the GGUF's vocabulary size (child path; default 49152)")
    a = ap.parse_args()
    step(f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} LD_LIBRARY_PATH="
         f"{os.environ.get('LD_LIBRARY_PATH', '')!r}")
    if a.torch_first:
        import torch

        step(f"torch {torch.__version__}, cuda available {torch.cuda.is_available()}")
        if torch.cuda.is_available():
            torch.zeros(1, device="cuda")
            step("torch CUDA context created")
    from quantkit.toolchain import llama_cpp as toolchain

    step(f"install dir {toolchain.install_dir()} (backend {toolchain.backend_of(toolchain.install_dir())})")
    step(f"lib dir {toolchain.lib_dir()}: {sorted(p.name for p in toolchain.lib_dir().iterdir())}")
    ll = toolchain.binding()
    step(f"binding {ll.__version__} from {ll.__file__}; LLAMA_CPP_LIB_PATH={os.environ.get('LLAMA_CPP_LIB_PATH')}")
    step(f"system info: {ll.llama_print_system_info().decode(errors='replace')}")
    import numpy as np

    from quantkit.evaluation.engines.llama_cpp_engine import LlamaCppEngine, _gpu_layers
    from quantkit.toolchain.llama_cpp_scorer import needs_child, open_llama

    step(f"n_gpu_layers the engine asks for: {_gpu_layers()}; the engine scores in a child: {needs_child()}")
    if needs_child():  # what the engine does: no in-process context beside torch (H200 runs 4-5: SIGSEGV)
        step("no in-process context (the engine scores in a child here)")
        n_vocab = 49152 if a.n_vocab is None else a.n_vocab
    else:
        step("opening the context in this process (Llama(...))")
        llm = open_llama(a.gguf, a.seq_len, 4, _gpu_layers())
        n_vocab = llm.n_vocab()
        step(f"context open: n_vocab {n_vocab}")
        del llm
    eng = LlamaCppEngine()
    handle = eng.load(a.gguf.parent, a.gguf.name)
    ids = np.random.default_rng(0).integers(10, n_vocab - 10, size=(a.windows, a.seq_len))
    nll, count = eng.nll(handle, ids, label="diag")
    scorer = handle.scorers[a.seq_len]
    step(f"scored {count} tokens through the engine ({type(scorer).__name__}, scored on {scorer.device}"
         f"{', ' + scorer.fallback_reason if scorer.fallback_reason else ''}): ppl {np.exp(nll / count):.2f}")
    step(f"describe: {eng.describe(handle)}")
    step("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
