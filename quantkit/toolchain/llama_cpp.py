"""Locate and run llama.cpp's CLI tools and its HF -> GGUF converter.

llama-cpp-python ships only libllama (no CLI tools, no convert_hf_to_gguf.py), so
scripts/setup_llama_cpp.sh builds the tools from the *same* pinned sdist's vendored
llama.cpp and caches them under $QUANTKIT_CACHE/llama.cpp/<version>/. Using one pinned
version for the Python binding, the tools and the converter keeps GGUF files, quant
types and imatrix formats mutually compatible.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from quantkit.errors import UserError

# Single source of truth: scripts/setup_llama_cpp.sh greps this exact line.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")
SETUP_FIX = "run `make setup` or `scripts/setup_llama_cpp.sh .venv`"


def _cache_root() -> Path:
    # Same rule as quantkit.util.cache_dir, but without creating directories:
    # a lookup must not leave an empty (half-looking) install dir behind.
    return Path(os.environ.get("QUANTKIT_CACHE", Path.home() / ".cache" / "quantkit"))


def install_dir() -> Path:
    """Where setup_llama_cpp.sh installs the tools + converter for the pinned version."""
    return _cache_root() / "llama.cpp" / LLAMA_CPP_PYTHON_VERSION


def _search_dirs() -> list[Path]:
    """Explicit override first ($QUANTKIT_LLAMA_CPP: a llama.cpp dir with bin/, or the bin dir
    itself), then the setup script's cache. PATH is handled separately via shutil.which."""
    dirs: list[Path] = []
    override = os.environ.get("QUANTKIT_LLAMA_CPP")
    if override:
        dirs += [Path(override) / "bin", Path(override)]
    dirs.append(install_dir() / "bin")
    return dirs


def find_tool(name: str) -> Path:
    """Path of a llama.cpp executable such as "llama-quantize"; UserError if not installed."""
    for d in _search_dirs():
        p = d / name
        if p.is_file() and os.access(p, os.X_OK):
            return p
    found = shutil.which(name)
    if found:
        return Path(found)
    raise UserError(f"llama.cpp tool {name!r} not found "
                    f"(searched $QUANTKIT_LLAMA_CPP, {install_dir() / 'bin'}, PATH)", fix=SETUP_FIX)


def convert_script() -> Path:
    """Path of llama.cpp's convert_hf_to_gguf.py (next to its conversion/ and gguf-py/ dirs)."""
    candidates = []
    override = os.environ.get("QUANTKIT_LLAMA_CPP")
    if override:
        # The override may name the llama.cpp dir or its bin/ dir.
        candidates += [Path(override), Path(override).parent]
    candidates.append(install_dir())
    for d in candidates:
        p = d / "convert_hf_to_gguf.py"
        if p.is_file():
            return p
    raise UserError(f"llama.cpp converter convert_hf_to_gguf.py not found "
                    f"(searched $QUANTKIT_LLAMA_CPP, {install_dir()})", fix=SETUP_FIX)


def convert_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for running convert_script(): its own gguf-py first on PYTHONPATH.

    The script also inserts gguf-py itself, but child imports (conversion/*) and any helper
    run with this env then see the converter's matching gguf version, not the venv's PyPI one.
    """
    env = dict(os.environ if base is None else base)
    gguf_py = str(convert_script().parent / "gguf-py")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (gguf_py, env.get("PYTHONPATH", "")) if p)
    return env


def run_tool(name: str, args: Sequence[str | os.PathLike], *, log_path: Path | None = None
             ) -> subprocess.CompletedProcess:
    """Run a llama.cpp tool, capturing output (llama.cpp logs mostly to stderr).

    The full output goes to log_path when given; a failure raises RuntimeError carrying the
    last stderr lines so the caller's one-line error still shows llama.cpp's actual reason.
    """
    cmd = [str(find_tool(name)), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if log_path is not None:
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(f"$ {' '.join(cmd)}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
                            f"\n--- exit code {proc.returncode} ---\n")
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        where = f" (full log: {log_path})" if log_path else ""
        raise RuntimeError(f"{name} exited with code {proc.returncode}{where}:\n{tail}")
    return proc
