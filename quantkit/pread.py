"""Read safetensors checkpoints with pread(2), not through a memory map, while llm-compressor's model-free path
(compressed-tensors' shard loader) reads them; and let that path free each input tensor once it is quantized.

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
import gc
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


@contextlib.contextmanager
def shard_inputs_released() -> Iterator[None]:
    """llm-compressor's model-free converter (`ModelFreePtqConverter.process`) deletes each input tensor from its
    dict once the tensor is quantized, so that a shard's inputs give way to its smaller outputs, but it deletes
    them from the copy `split_fused_moe_experts` returns, while the caller's dict (`_process_shard`'s
    `tensors`) still holds every input until the shard is done: all inputs, all outputs and the largest
    tensor's float32 transients at once. Emptying the caller's dict once the copy exists leaves the copy the
    only holder (nothing reads the old dict again: the caller rebinds `tensors` to the converter's result);
    and collect the previous shard's garbage first (below).
    Measured: see docs/benchmarks/cpu-scale/README.md (model-free)."""
    from llmcompressor.entrypoints.model_free import converter

    split = converter.split_fused_moe_experts

    def split_and_release(tensors):
        # the previous shard's quantized modules live on in reference cycles (module <-> its observer) with
        # their outputs until the cyclic collector happens to run: free them before this shard's transients
        gc.collect()
        out = split(tensors)
        tensors.clear()
        return out

    converter.split_fused_moe_experts = split_and_release
    try:
        yield
    finally:
        converter.split_fused_moe_experts = split
