"""The transformers engine: loads HF directories (dense, compressed-tensors, ...) and scores token windows.

It is a reference engine, not a serving engine: its numbers are quality numbers, and speed figures from it
are labelled `transformers-eager`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from quantkit.evaluation.engines import register_engine
from quantkit.evaluation.latency import device_label, speed_record, ttft_summary
from quantkit.util import cpu_threads, library_versions


@dataclass
class Loaded:
    model: object
    device: str
    dtype: str


@register_engine
class TransformersEngine:
    name = "transformers"

    def load(self, path: Path, entry: str = ".", dtype: str = "auto", trust_remote_code: bool = False) -> Loaded:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(cpu_threads())
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # On CPU, 16-bit matmuls are slow and some kernels missing: evaluate dense weights in fp32 there.
        want = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        torch_dtype = want.get(dtype, "auto")
        if device == "cpu" and torch_dtype in (torch.bfloat16, torch.float16):
            torch_dtype = torch.float32
        # No device_map when the model fits one GPU: accelerate's dispatch hooks add per-module Python overhead
        # that dominates decode speed. A model larger than the GPU is spread over GPU(s) and host RAM instead.
        device_map = None
        if device == "cuda":
            from quantkit.placement import probe, whole_model_device_map

            size = sum(f.stat().st_size for f in (Path(path) / entry).glob("*.safetensors"))
            device_map, _ = whole_model_device_map(size, probe())
        if device_map == "auto":
            model = AutoModelForCausalLM.from_pretrained(Path(path) / entry, dtype=torch_dtype, device_map="auto",
                                                         trust_remote_code=trust_remote_code)
        else:
            # artifacts are safetensors; a dense source was checked by sources.resolve (pickle only if allowed)
            model = AutoModelForCausalLM.from_pretrained(Path(path) / entry, dtype=torch_dtype,
                                                         trust_remote_code=trust_remote_code).to(device)
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

    def throughput(self, handle: Loaded, spec) -> dict:
        """Prefill and decode speed with a KV cache, eager PyTorch (a reference, not a serving engine).
        Prompt tokens are seeded random ids: speed does not depend on what the tokens say."""
        import statistics

        import torch
        from rich.progress import Progress

        from quantkit.util import StagePeak

        if spec.threads:
            torch.set_num_threads(spec.threads)
        model, dev = handle.model, handle.device
        vocab = model.config.vocab_size
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        results = {}
        gen = torch.Generator().manual_seed(0)
        with torch.inference_mode(), StagePeak() as rss, Progress(transient=True) as bar:
            for b in spec.batch_sizes:
                ids = torch.randint(0, vocab, (b, spec.prompt_len), generator=gen).to(dev)
                ttft, prefill, decode = [], [], []
                task = bar.add_task(f"throughput batch {b}", total=spec.warmup + spec.repetitions)
                for rep in range(spec.warmup + spec.repetitions):
                    sync()
                    t0 = time.perf_counter()
                    out = model(input_ids=ids, use_cache=True)
                    nxt = out.logits[:, -1:].argmax(-1)
                    sync()
                    t1 = time.perf_counter()
                    cache = out.past_key_values
                    for _ in range(spec.gen_len - 1):
                        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                    sync()
                    t2 = time.perf_counter()
                    bar.advance(task)
                    if rep >= spec.warmup:
                        ttft.append(t1 - t0)
                        prefill.append(b * spec.prompt_len / (t1 - t0))
                        decode.append(b * (spec.gen_len - 1) / (t2 - t1))
                results[str(b)] = {"prefill_tok_s": round(statistics.median(prefill), 1),
                                   "decode_tok_s": round(statistics.median(decode), 2), **ttft_summary(ttft)}
        peak = (torch.cuda.max_memory_allocated() / 2**20) if dev == "cuda" else rss.peak
        return speed_record({**self.describe(handle), "engine": "transformers-eager"}, results, spec, peak,
                            "cuda allocated" if dev == "cuda" else "rss")

    def describe(self, handle: Loaded) -> dict:
        import torch

        return {"engine": "transformers", "device": device_label(handle.device), "dtype": handle.dtype,
                "threads": torch.get_num_threads(),
                "versions": library_versions()}
