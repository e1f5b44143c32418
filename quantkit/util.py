"""Small shared helpers: hashing, cache locations, library versions, host facts, resource use."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import socket
import sys
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterable

import quantkit

CHUNK = 8 << 20


def sha256_fileobj(f) -> str:
    h = hashlib.sha256()
    while block := f.read(CHUNK):
        h.update(block)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_fileobj(f)


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("QUANTKIT_CACHE", Path.home() / ".cache" / "quantkit"))
    p = root.joinpath(*parts)
    p.mkdir(parents=True, exist_ok=True)
    return p


def cached_sha256(path: Path) -> str:
    """sha256 of a file, memoised on (path, size, mtime) so re-runs don't re-read multi-GB weights."""
    st = path.stat()
    key = sha256_json([str(path.resolve()), st.st_size, st.st_mtime_ns])
    memo = cache_dir("hashes") / key
    if memo.exists():
        return memo.read_text().strip()
    digest = sha256_file(path)
    memo.write_text(digest)
    return digest


def fingerprint_files(files: Iterable[Path], root: Path) -> str:
    """One digest over (relative name, content hash) pairs, order-independent."""
    pairs = sorted((str(f.relative_to(root)), cached_sha256(f)) for f in files)
    return sha256_json(pairs)


def dist_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


CORE_LIBRARIES = ("torch", "transformers", "safetensors", "llmcompressor", "compressed-tensors",
                  "nvidia-modelopt", "llama_cpp_python", "gguf", "datasets", "accelerate")


@lru_cache
def library_versions(names: tuple[str, ...] = CORE_LIBRARIES) -> dict[str, str]:
    out = {"python": platform.python_version(), "quantkit": quantkit.__version__}
    for n in names:
        v = dist_version(n)
        if v:
            out[n] = v
    return out


def host_info() -> dict[str, Any]:
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": sys.version.split()[0]}


def cpu_threads() -> int:
    """Math threads for CPU work (torch, llama.cpp's tools): OMP_NUM_THREADS when it is set, which is this process's
    share of the cores (a pytest-xdist worker, a Ray task, a CI job next to others), else every core it may run on.
    Why: more busy-waiting OpenMP threads than cores (two 2-thread processes on 2 cores) spin at every parallel
    region; measured with OMP_NUM_THREADS=1 overridden to 2: SmolLM2's GPTQ pass took ~30 CPU-s per decoder layer
    instead of ~2 (docs/benchmarks/cpu-2core/tests.md)."""
    share = os.environ.get("OMP_NUM_THREADS", "")
    if share.isdigit() and int(share) > 0:
        return int(share)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def peak_rss_mb() -> float:
    """Peak resident set of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_memory() -> None:
    """Hand freed heap back to the OS between targets. Each target loads and drops a model; glibc keeps the
    freed arenas mapped (fragmented by the many tensor-sized blocks), so without a trim the resident set grows
    target by target although nothing is referenced. Python and torch have no call for this: ctypes it is."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:  # not glibc (musl, macOS): nothing to trim
        trim = None
    if trim is not None:
        trim(0)


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class StagePeak:
    """Peak RSS inside one stage: ru_maxrss only knows the whole process, so sample /proc every 20 ms. With the
    peak, its split at that moment: anonymous (tensors, heap) and file-backed (mapped safetensors, libraries),
    which says whether a peak is copies of the weights or their mapped pages."""

    def __init__(self):
        import threading

        self.peak, self.anon, self.file = _rss_split_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self):
        total, anon, file = _rss_split_mb()
        if total > self.peak:
            self.peak, self.anon, self.file = total, anon, file

    def _run(self):
        while not self._stop.wait(0.02):
            self._sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def _rss_split_mb() -> tuple[float, float, float]:
    """(resident, anonymous, file-backed + shared) in MB from /proc/self/statm (cheap enough for 20 ms)."""
    with open("/proc/self/statm") as f:
        resident, shared = (int(x) for x in f.read().split()[1:3])
    page = os.sysconf("SC_PAGE_SIZE") / 2**20
    return resident * page, (resident - shared) * page, shared * page


def quiet_llmcompressor() -> None:
    """llm-compressor logs through loguru at INFO (plus a METRIC line per quantized module: thousands for a real
    model), which buries quantkit's own progress; its LLM_COMPRESSOR_LOG_LEVEL still overrides this."""
    from llmcompressor import LoggerConfig, configure_logger

    configure_logger(LoggerConfig(console_log_level="ERROR"))
