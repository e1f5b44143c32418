"""Memory-bandwidth roofline for decode: at batch 1 every generated token reads every weight once, so
tokens/s <= bandwidth / bytes of weights read per token. Bytes come from the artifact's own files.

Counted: every tensor a decode step reads in full (linear weights, their scales/zero points, norms, lm_head).
Not counted: the token-embedding table (a decode step gathers one row of it), unless the output projection is
tied to it, in which case the table is read in full as lm_head.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path

EMBED_NAMES = ("embed_tokens", "wte", "word_embeddings", "token_embd")
HEAD_NAMES = ("lm_head", "output.weight")


def _is_embedding(name: str) -> bool:
    return any(k in name for k in EMBED_NAMES)


def _count(tensors: dict[str, int]) -> dict:
    embed = {n: b for n, b in tensors.items() if _is_embedding(n)}
    tied = not any(any(h in n for h in HEAD_NAMES) for n in tensors)
    read = sum(b for n, b in tensors.items() if not _is_embedding(n))
    if tied:  # lm_head shares the embedding matrix: the whole table is read for every token
        read += sum(b for n, b in embed.items() if n.endswith("weight"))
    return {"bytes_per_token": read, "embedding_bytes": sum(embed.values()), "tied_lm_head": tied}


FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def safetensors_tensor_bytes(directory: Path, float_bytes: int | None = None) -> dict[str, int]:
    """Tensor name -> bytes, from safetensors headers only (no weights are loaded). float_bytes: count
    floating tensors at this element size (a dense checkpoint loaded in another dtype, e.g. fp32 file as bf16)."""
    import json
    import math
    import struct

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start, end = meta["data_offsets"]
            out[name] = end - start
            if float_bytes and meta["dtype"] in FLOAT_DTYPES:
                out[name] = math.prod(meta["shape"]) * float_bytes
    return out


def gguf_tensor_bytes(path: Path) -> dict[str, int]:
    from quantkit.toolchain.gguf_file import gguf_summary

    return {t.name: t.n_bytes for t in gguf_summary(path).tensors}


def weight_bytes(path: Path, entry: str = ".", float_bytes: int | None = None) -> dict:
    """Bytes read per decoded token for an artifact (HF directory or a .gguf entry)."""
    target = Path(path) / entry
    if target.suffix == ".gguf":
        return _count(gguf_tensor_bytes(target))
    return _count(safetensors_tensor_bytes(target, float_bytes))


@functools.lru_cache(maxsize=1)
def memory_bandwidth(size_mb: int = 256, repeats: int = 5) -> dict:
    """Measured once per process: best of `repeats` copies of a large buffer (read + write bytes / time).
    256 MiB is far beyond any last-level cache; 1 GiB (twice: source and destination) put 2 GiB on top of the
    loaded models (bench_build: baseline evaluate peak 3.1 GB with 0.5 GB loaded; demo build peak 4.1 GB)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = size_mb * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return {"device": device, "bytes_copied": 2 * n * 4, "gb_per_s": round(2 * n * 4 / best / 1e9, 2),
            "method": f"torch copy_ of {size_mb} MiB fp32, best of {repeats}, read+write bytes"}


def decode_bound(weight: dict, bandwidth: dict) -> float:
    """Upper bound on batch-1 decode tokens/s."""
    return bandwidth["gb_per_s"] * 1e9 / weight["bytes_per_token"]
