"""The transformers engine: loads HF directories (dense, compressed-tensors, ...) and scores token windows.

It is a reference engine, not a serving engine: its numbers are quality numbers, and speed figures from it
are labelled `transformers-eager`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from quantkit.evaluation.engines import register_engine
from quantkit.util import library_versions


@dataclass
class Loaded:
    model: object
    device: str
    dtype: str


@register_engine
class TransformersEngine:
    name = "transformers"

    def load(self, path: Path, entry: str = ".", dtype: str = "auto") -> Loaded:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(os.cpu_count() or 1)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # On CPU, 16-bit matmuls are slow and some kernels missing: evaluate dense weights in fp32 there.
        want = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        torch_dtype = want.get(dtype, "auto")
        if device == "cpu" and torch_dtype in (torch.bfloat16, torch.float16):
            torch_dtype = torch.float32
        model = AutoModelForCausalLM.from_pretrained(Path(path) / entry, dtype=torch_dtype, device_map=device)
        model.eval()
        return Loaded(model, device, str(next(model.parameters()).dtype).removeprefix("torch."))

    def nll(self, handle: Loaded, ids, batch_size: int = 1, label: str = "") -> tuple[float, int]:
        import torch
        import torch.nn.functional as F
        from rich.progress import Progress

        total, count = 0.0, 0
        with torch.inference_mode(), Progress(transient=True) as bar:
            task = bar.add_task(f"perplexity {label}", total=ids.shape[0])
            for start in range(0, ids.shape[0], batch_size):
                batch = ids[start:start + batch_size].to(handle.device)
                logits = handle.model(input_ids=batch).logits[:, :-1].float()
                target = batch[:, 1:]
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
                total += loss.item()
                count += target.numel()
                bar.advance(task, batch.shape[0])
        return total, count

    def describe(self, handle: Loaded) -> dict:
        import torch

        dev = handle.device
        if dev == "cuda":
            dev = f"cuda:{torch.cuda.get_device_name(0)}"
        return {"engine": "transformers", "device": dev, "dtype": handle.dtype, "threads": torch.get_num_threads(),
                "versions": library_versions()}
