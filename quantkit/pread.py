"""Read safetensors checkpoints with pread(2), not through a memory map, while a library loads them.

transformers 5 (`from_pretrained`) and compressed-tensors (llm-compressor's model-free path) open every
checkpoint file memory-mapped and copy each tensor out of the mapping. The pages they read stay resident in the
process until the file is closed, at the end of the whole load (or of the shard): the peak resident set is then
the weights twice, the copies plus the mapped file, and in-place edits of tensors that are still mapped (e.g.
SmoothQuant's rescaling) duplicate their pages once more (copy-on-write). safetensors' own `pread` backend reads
each tensor straight into its own memory; the file's bytes pass through the page cache, which the kernel
reclaims and which is not the process's memory. transformers picks that backend itself only on Windows and
Apple MPS, and neither library takes it as an argument, so quantkit hands it in by replacing the `safe_open`
name these modules imported, for the duration of one load.
"""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

# where the libraries quantkit drives open checkpoints to load them
LOADERS = ("transformers.modeling_utils", "compressed_tensors.utils.safetensors_load")


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
