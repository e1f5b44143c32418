"""Locate and run llama.cpp's CLI tools, its shared libraries and its HF -> GGUF converter.

scripts/setup_llama_cpp.sh makes ONE CMake build of the llama.cpp vendored in the pinned
llama-cpp-python sdist: the tools (bin/), the shared libraries libllama/libggml* (lib/,
$ORIGIN rpaths, so the tree is relocatable) and the converter, cached under
$QUANTKIT_CACHE/llama.cpp/<version>-<backend>-<options hash>/. The binding's pure-Python
package is installed without compiling and loads lib/ from that tree (binding() below).
One pinned revision for binding, tools and converter keeps GGUF files, quant types and
imatrix formats mutually compatible.

`python -m quantkit.toolchain.llama_cpp build-spec BACKEND` prints the cache key and the
CMake options for the setup script, so the key is computed in one place.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import subprocess
from pathlib import Path
from typing import Sequence

from quantkit.errors import UserError
from quantkit.util import cpu_threads

# Single source of truth: scripts/setup_llama_cpp.sh greps this exact line.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")
SETUP_FIX = "run `make setup` or `scripts/setup_llama_cpp.sh .venv`"


# CMake options of the one build; any change gives a new cache key. Shared libs with $ORIGIN
# rpaths: the tools find lib/ as ../lib, the libraries find each other next to themselves.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON",
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN/../lib;$ORIGIN",
    "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
)
BACKEND_OPTIONS = {"cpu": (), "cuda": ("-DGGML_CUDA=ON",)}
# Build targets: the tools pull in libllama, libggml* and llama-common.
LIB_TARGETS = ("llama",)


def build_options(backend: str) -> tuple[str, ...]:
    if backend not in BACKEND_OPTIONS:
        raise UserError(f"unknown llama.cpp backend {backend!r}", fix=f"use one of {sorted(BACKEND_OPTIONS)}")
    return CMAKE_OPTIONS + BACKEND_OPTIONS[backend]


def build_key(backend: str) -> str:
    """Cache directory name: version, backend, and a hash of every CMake option."""
    digest = hashlib.sha256("\n".join(build_options(backend)).encode()).hexdigest()[:10]
    return f"{LLAMA_CPP_PYTHON_VERSION}-{backend}-{digest}"


def default_threads() -> int:
    """Threads for llama.cpp's tools: this process's share of the cores (quantkit.util.cpu_threads)."""
    return cpu_threads()


def _cache_root() -> Path:
    # Same rule as quantkit.util.cache_dir, but without creating directories:
    # a lookup must not leave an empty (half-looking) install dir behind.
    return Path(os.environ.get("QUANTKIT_CACHE", Path.home() / ".cache" / "quantkit"))


def install_dir(backend: str | None = None) -> Path:
    """Where setup_llama_cpp.sh installs tools, libs and converter for the pinned version.

    backend None: $QUANTKIT_LLAMA_CPP_BACKEND if set, else the CUDA build when one is complete,
    else the CPU build (the tools of a CUDA build also run on the CPU with -ngl 0).
    """
    root = _cache_root() / "llama.cpp"
    if backend is None:
        backend = os.environ.get("QUANTKIT_LLAMA_CPP_BACKEND")
    if backend is None:
        cuda = root / build_key("cuda")
        backend = "cuda" if (cuda / ".complete").is_file() else "cpu"
    return root / build_key(backend)


def backend_of(path: Path) -> str:
    """The backend ("cpu"/"cuda") of an install dir or of a tool inside it; "unknown" elsewhere."""
    for p in (Path(path), *Path(path).parents):
        for b in BACKEND_OPTIONS:
            if p.name == build_key(b):
                return b
    return "unknown"


def cuda_device_visible() -> bool:
    """Whether this process can use a CUDA device. A CUDA build of llama.cpp asked for GPU layers on a host where
    none is visible (GPUs hidden, no driver) falls back to the CPU by itself: records must not then say cuda.
    Torch is consulted only when it is already imported (importing it costs seconds and, beside a CUDA build of
    llama.cpp, crashes the binding: quantkit/toolchain/llama_cpp_scorer.py)."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip() in ("", "-1"):
        return False
    if "torch" in sys.modules:
        return bool(sys.modules["torch"].cuda.is_available())
    return _nvidia_smi_lists_a_gpu()


@functools.lru_cache(maxsize=None)  # one probe per process (tests: _nvidia_smi_lists_a_gpu.cache_clear())
def _nvidia_smi_lists_a_gpu() -> bool:
    """`nvidia-smi -L` prints one `GPU i: NAME (UUID ...)` line per device; no tool or no driver: none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=15).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.startswith("GPU") for line in out.splitlines())


def lib_dir() -> Path:
    """Directory holding libllama/libggml* for the binding ($QUANTKIT_LLAMA_CPP/lib overrides)."""
    override = os.environ.get("QUANTKIT_LLAMA_CPP")
    for d in ([Path(override) / "lib"] if override else []) + [install_dir() / "lib"]:
        if (d / "libllama.so").exists() or (d / "libllama.dylib").exists():
            return d
    raise UserError(f"llama.cpp shared library libllama not found (searched $QUANTKIT_LLAMA_CPP, "
                    f"{install_dir() / 'lib'})", fix=SETUP_FIX)


def binding():
    """The llama_cpp Python module, loading the libraries of the cached build.

    The binding is installed as pure Python (no compile); it loads libllama from
    $LLAMA_CPP_LIB_PATH, set here unless the caller already chose a library.
    """
    if "llama_cpp" not in sys.modules:
        os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(lib_dir()))
    try:
        import llama_cpp
    except ImportError as e:
        raise UserError(f"llama-cpp-python is not installed ({e})", fix=SETUP_FIX) from None
    return llama_cpp


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


def _sample_hwm(pid: int, peak: list[float], done) -> None:
    """Keep peak[0] = the process's VmHWM in MB (monotonic, so the last read before exit is its peak)."""
    path = f"/proc/{pid}/status"
    while True:
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak[0] = max(peak[0], int(line.split()[1]) / 1024)
        except (OSError, ValueError):
            return  # exited (or not Linux)
        if done.wait(0.05):
            return


def run_tool(name: str, args: Sequence[str | os.PathLike], *, log_path: Path | None = None
             ) -> subprocess.CompletedProcess:
    """Run a llama.cpp tool, capturing output (llama.cpp logs mostly to stderr).

    The full output goes to log_path when given; a failure raises RuntimeError carrying the
    last stderr lines so the caller's one-line error still shows llama.cpp's actual reason.
    The result carries `peak_rss_mb`: the tool's own peak RSS (VmHWM of its process, sampled while it runs;
    wait4's ru_maxrss would include the forked Python parent's RSS from before exec).
    """
    import tempfile
    import threading

    cmd = [str(find_tool(name)), *map(str, args)]
    peak = [0.0]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err)
        done = threading.Event()
        sampler = threading.Thread(target=_sample_hwm, args=(p.pid, peak, done), daemon=True)
        sampler.start()
        try:
            p.wait()
        except BaseException:
            p.kill()
            p.wait()
            raise
        finally:
            done.set()
            sampler.join()
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(cmd, p.returncode, out.read().decode(errors="replace"),
                                           err.read().decode(errors="replace"))
    proc.peak_rss_mb = peak[0]
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

if __name__ == "__main__":
    # scripts/setup_llama_cpp.sh: `build-spec BACKEND` -> key line, then one CMake option per line.
    if len(sys.argv) != 3 or sys.argv[1] != "build-spec":
        sys.exit("usage: python -m quantkit.toolchain.llama_cpp build-spec {cpu,cuda}")
    print(build_key(sys.argv[2]))
    print("\n".join(build_options(sys.argv[2])))
