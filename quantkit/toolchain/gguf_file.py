"""What a GGUF file holds (tensor names, types, sizes; a few metadata keys), parsed once per file per process.

gguf's `GGUFReader` makes a numpy view per vocabulary entry and merge: ~2 CPU-s per parse with SmolLM2's 49k-token
vocabulary, whatever the model's size. A GGUF target's file was parsed three times (its facts when produced, the
engine's file type and the roofline's tensor bytes when evaluated); one parse now serves them all. The cache is
keyed by the file's identity (device, inode, size, modification time), not its path: a file rewritten in place is
parsed again, a hard link of it (the store's publish on one filesystem) is the same file. Only small summaries are
kept, never the reader (it holds the file mapped)."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

METADATA = ("general.architecture", "general.file_type", "tokenizer.ggml.model", "tokenizer.ggml.pre")
_KEEP = 64  # summaries per process: a few hundred bytes each plus one small record per tensor


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type: str  # GGMLQuantizationType name, e.g. Q4_K
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class GGUFSummary:
    tensors: tuple[GGUFTensor, ...]
    metadata: dict  # the METADATA keys present in the file, as values

    def file_type(self) -> str:
        """`general.file_type` as llama.cpp names it (Q8_0, Q4_K_M, F16 ...), or "unknown"."""
        import gguf

        ft = self.metadata.get("general.file_type")
        if ft is None:
            return "unknown"
        try:
            return gguf.LlamaFileType(int(ft)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            return str(ft)


_cache: dict[tuple, GGUFSummary] = {}
_lock = threading.Lock()


def gguf_summary(path: Path | str) -> GGUFSummary:
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _cache:
            return _cache[key]
    import gguf

    r = gguf.GGUFReader(str(path))
    summary = GGUFSummary(
        tensors=tuple(GGUFTensor(t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes)) for t in r.tensors),
        metadata={k: r.fields[k].contents() for k in METADATA if k in r.fields})
    del r
    with _lock:
        if len(_cache) >= _KEEP:
            _cache.pop(next(iter(_cache)))
        _cache[key] = summary
    return summary
