"""Read safetensors checkpoints with pread(2), not through a memory map, while llm-compressor's model-free path
(compressed-tensors' shard loader) reads them.

That loader opens each checkpoint shard memory-mapped and copies every tensor out of the mapping; the pages it
read stay resident in the process until the shard's file is closed, after the whole shard is loaded, so each
shard is held twice (its copies plus the mapped file). safetensors' own `pread` backend reads each tensor
straight into its own memory; the bytes pass through the page cache, which the kernel reclaims and which is not
the process's memory. The loader takes no backend argument, so quantkit hands it in by replacing the
`safe_open` name that module imported, for the duration of one call. (transformers' `from_pretrained` is left
memory-mapped: its tensors are views of the mapping, each page resident once, read or copied on write.)
"""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

# where the library opens the checkpoint's shards
LOADERS = ("compressed_tensors.utils.safetensors_load",)


@contextlib.contextmanager
def pread_checkpoints(modules: tuple[str, ...] = LOADERS) -> Iterator[None]:
    from safetensors import safe_open

    def pread_open(filename, framework, device="cpu", *, backend="mmap"):
        # tensors read to the CPU come from pread; other devices keep what the caller asked for
        return safe_open(filename, framework=framework, device=device,
                         backend="pread" if str(device) == "cpu" else backend)

    patched = []
    for name in modules:
        mod = importlib.import_module(name)
        if getattr(mod, "safe_open", None) is safe_open:
            mod.safe_open = pread_open
            patched.append(mod)
    try:
        yield
    finally:
        for mod in patched:
            mod.safe_open = safe_open
