"""Which kernel serves each weight kind, per GPU and batch size: data measured on the GPU, not guessed.

`data/choices.json` maps a GPU name (as `torch.cuda.get_device_name` reports it) to {kind: {batch: kernel}};
it is written from the end-to-end runs of `scripts/bench_engine_gpu.py` (docs/benchmarks/h200/). A GPU or batch
size it does not list gets `DEFAULT` (the kernels that were fastest at every batch size on the H200 except
where the table says otherwise). On a CPU every kind runs its reference path.

gemlite picks its bundled Triton autotune configuration by a substring of the GPU name and has none for the
H200, so without one it autotunes every shape on first use (minutes). `data/gemlite-<gpu>.json` is the cache
gemlite wrote after autotuning once on that GPU (`gemlite.cache_config`); it is loaded before any gemlite call,
over gemlite's own configuration for the nearest GPU it ships (`BASE`: the H200 is an H100 chip with faster
memory), so shapes the shipped file does not cover start from tuned settings instead of a new autotune.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

DATA = Path(__file__).parent / "data"
DEFAULT = {"dense": "cublas-bf16", "fp8": "scaled_mm-epilogue", "int8": "gemlite", "int4": "gemlite",
           "attention": "sdpa-gqa"}  # the decode attention variant (kernels/attention.py), by batch size
# Kinds whose module holds several kernels and picks one per call by the number of tokens in the call (decode
# steps and prefill of one batch size need different kernels): their table entry is keyed by tokens, not batch.
BY_TOKENS = ("int4",)
# Kinds whose q/k/v and gate/up are fused into one GEMM each (kernels/fuse.py); "fuse" in a GPU's table
# overrides it. int8 is not: gemlite autotunes every new shape (minutes) and its fused shapes are not tuned.
FUSE = ["dense", "fp8", "int4"]
BASE = {"h200": "h100"}  # gemlite ships no H200 configuration; the H100's is the same sm90 chip
CPU = {"dense": "reference", "fp8": "reference", "int8": "reference", "int4": "reference", "attention": "matmul"}
# A choice table to try before it is committed (scripts/bench_decode_attention.py writes one): same format as
# data/choices.json, read instead of it.
OVERRIDE_ENV = "QUANTKIT_KERNEL_CHOICES"


def gpu_slug(name: str) -> str:
    return name.lower().replace("nvidia", "").strip().replace(" ", "_")


@functools.lru_cache(maxsize=1)
def _table() -> dict:
    import os

    f = Path(os.environ.get(OVERRIDE_ENV) or DATA / "choices.json")
    return json.loads(f.read_text()) if f.exists() else {}


def kernel_set(device: str, batch_size: int) -> dict:
    if device != "cuda":
        return dict(CPU, fuse=list(FUSE))
    import torch

    return choose(_table().get(torch.cuda.get_device_name(0), {}), batch_size)


def nearest_below(by_n: dict, n: int):
    """The entry measured at the size nearest below n (or the smallest measured): 8 takes the choice made at 1,
    and 64 the one made at 16."""
    known = sorted(int(b) for b in by_n)
    return by_n[str(max((b for b in known if b <= n), default=known[0]))]


def choose(per_gpu: dict, batch_size: int) -> dict:
    """DEFAULT overridden by a GPU's table: per kind, the choice for this batch size (`nearest_below`), or for
    BY_TOKENS kinds the whole {tokens: kernel} table (the module picks per call); "fuse": the fused kinds."""
    out: dict = dict(DEFAULT, fuse=list(FUSE))
    for kind, by_batch in per_gpu.items():
        if kind == "fuse":
            out["fuse"] = list(by_batch)
        elif kind == "compile":  # torch._inductor.config settings the engine compiles with (measured to help)
            out["compile"] = dict(by_batch)
        elif kind in BY_TOKENS:
            out[kind] = dict(by_batch)
        else:
            out[kind] = nearest_below(by_batch, batch_size)
    return out


@functools.lru_cache(maxsize=1)
def data_fingerprint() -> str:
    """sha256 over the kernel choice and autotune files: a new table means new speed numbers."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(DATA.glob("*.json")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def load_gemlite_config() -> str | None:
    """Load the shipped gemlite autotune cache for this GPU; returns the file used (None: gemlite autotunes)."""
    import torch

    import gemlite

    slug = gpu_slug(torch.cuda.get_device_name(0))
    used = []
    base = next((b for tag, b in BASE.items() if tag in slug), None)
    if base:
        f = Path(gemlite.__file__).parent / "configs" / f"{base}.json"
        if f.exists() and gemlite.load_config(str(f)):
            used.append(f"gemlite/configs/{f.name}")
    f = DATA / f"gemlite-{slug}.json"
    if f.exists() and gemlite.load_config(str(f)):
        used.append(f"quantkit {f.name}")
    return " + ".join(used) or None
