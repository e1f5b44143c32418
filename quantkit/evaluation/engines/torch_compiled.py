"""The "torch-compiled" engine (gpt-fast design): an artifact's own files on fast per-format kernels.

It reads the artifact directory (not the build's in-memory model), builds the decoder skeleton on the meta
device, puts a kernel-backed module in place of every linear (`kernels/linear.py`), loads the other tensors,
and on a GPU:
- compiles each decoder layer with `torch.compile` (regional: the layers share one compiled graph per shape),
- captures one decode step (forward, greedy argmax on the device, KV-cache write, position increment) in a
  CUDA graph, so decoding is graph replays with no host synchronisation per token,
- times prefill of `prompt_len` tokens and `gen_len - 1` decode steps per batch size (recipe `eval.throughput`).
The int4 kernel (gemlite or tinygemm) is chosen per batch size from measurements committed as data
(`kernels/choices.json`, by GPU name); batch sizes that need another kernel set reload the artifact.
Without CUDA the same modules run eagerly with every kernel replaced by its reference path (dequantized
matmul): that is how the test suite checks its perplexity against the transformers engine's.

Its numbers are this engine's, not vLLM's, SGLang's or TensorRT-LLM's: serving engines batch, schedule and
fuse differently and may be faster or slower.
"""
from __future__ import annotations

import socket
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.evaluation.engines import register_engine
from quantkit.evaluation.latency import device_label, speed_record
from quantkit.evaluation.kernels.choices import kernel_set, load_gemlite_config
from quantkit.evaluation.kernels.weights import NotServed, QuantWeight, read_artifact
from quantkit.util import library_versions

ENGINE = "torch-compiled"
KERNEL_LIBRARIES = ("torch", "triton", "gemlite", "transformers")


@dataclass
class Handle:
    path: Path
    model: object
    device: str
    dtype: object
    layout: str
    kernels: dict
    compiled: bool
    pinned: bool  # kernels given by the caller: keep them at every batch size
    used: dict = field(default_factory=dict)  # kind -> kernel names actually instantiated


def _kernel_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in KERNEL_LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


@register_engine
class TorchCompiledEngine:
    name = ENGINE
    serves = ("transformers", "modelopt-dequant")  # artifacts of these engines it can time on a GPU

    def available(self) -> bool:
        import torch

        return torch.cuda.is_available()

    def load(self, path: Path, entry: str = ".", dtype: str = "auto", trust_remote_code: bool = False,
             batch_size: int = 1, kernels: dict | None = None, compile: bool | None = None) -> Handle:
        """Own model definition only: `trust_remote_code` is accepted (the registry's signature) and never
        needed; an architecture it does not define raises NotServed."""
        import torch
        from transformers import AutoConfig

        from quantkit.evaluation.kernels.linear import dense_linear, make_linear
        from quantkit.evaluation.kernels.llama import Decoder, unsupported

        device = "cuda" if torch.cuda.is_available() else "cpu"
        want = {"float16": torch.float16, "bfloat16": torch.bfloat16}
        dt = want.get(dtype, torch.bfloat16) if device == "cuda" else torch.float32  # CPU: fp32, as transformers
        target = Path(path) / entry
        config = AutoConfig.from_pretrained(target)
        why = unsupported(config)
        if why:
            raise NotServed(why)
        _, linears, other, layout = read_artifact(target)
        if config.tie_word_embeddings and "model.embed_tokens.weight" not in other and "lm_head.weight" in other:
            other["model.embed_tokens.weight"] = other.pop("lm_head.weight")  # a tied pair saved under one name
        pinned = kernels is not None
        kernels = {**kernel_set(device, batch_size), **(kernels or {})}
        fused = _fuse(linears, other, config.num_hidden_layers, set(kernels.get("fuse", ())))
        if device == "cuda":
            load_gemlite_config()
        with torch.device("meta"):
            model = Decoder(config, lambda name: torch.nn.Identity(), frozenset(fused),
                            kernels.get("attention", "matmul"))
        used: dict[str, set] = {}
        for name, module in list(model.named_modules()):
            if not isinstance(module, torch.nn.Identity) or name == "" or name.endswith("rotary"):
                continue
            if name in linears:
                new = make_linear(linears.pop(name), device, dt, kernels)
            elif f"{name}.weight" in other:
                new = dense_linear(other.pop(f"{name}.weight"), other.pop(f"{name}.bias", None), device, dt)
            elif name == "lm_head" and config.tie_word_embeddings:
                new = None  # tied below, after the embedding is loaded
            else:
                raise NotServed(f"{name}: no weight in the artifact")
            kind = "dense" if isinstance(new, torch.nn.Linear) or new is None else type(new).__name__
            if new is not None:
                used.setdefault(kind, set()).add(getattr(new, "kernel", "?"))
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, leaf, new)
        state = {k: (v.to(device, dt) if v.is_floating_point() else v.to(device)) for k, v in other.items()}
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        model.rotary = LlamaRotaryEmbedding(config).to(device)  # its inv_freq is computed, not stored
        _, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if missing or unexpected:
            raise NotServed(f"tensors missing {missing[:3]} / not placed {unexpected[:3]}")
        if model.lm_head is None or isinstance(model.lm_head, torch.nn.Identity):
            model.lm_head = dense_linear(model.model.embed_tokens.weight.data, None, device, dt)
            used.setdefault("dense", set()).add(model.lm_head.kernel)
        model.eval()
        used = {k: sorted(v) for k, v in used.items()}
        if fused:
            used["fused"] = sorted(fused)
        used["attention"] = [kernels.get("attention", "matmul")]
        h = Handle(target, model, device, dt, layout, kernels, False, pinned, used)
        if device == "cuda" if compile is None else compile:
            self.compile(h)
        return h

    def compile(self, h: Handle) -> None:
        """Regional compilation: the decoder layers share one compiled graph per input shape. Inductor settings
        from the kernel table ("compile", e.g. coordinate_descent_tuning) apply to the whole process."""
        import torch._dynamo
        import torch._inductor.config as inductor_config

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for key, value in h.kernels.get("compile", {}).items():
            if not hasattr(inductor_config, key):
                raise ValueError(f"kernel table: unknown torch._inductor.config setting {key!r}")
            setattr(inductor_config, key, value)
        for layer in h.model.model.layers:
            layer.compile(dynamic=False, fullgraph=True)
        h.compiled = True

    def nll(self, handle: Handle, ids, batch_size: int = 1, label: str = "") -> tuple[float, int]:
        import torch
        import torch.nn.functional as F

        total, count = 0.0, 0
        model = handle.model
        model.drop_cache()
        with torch.inference_mode():
            for start in range(0, ids.shape[0], batch_size):
                batch = ids[start:start + batch_size].to(handle.device)
                pos = torch.arange(batch.shape[1], device=handle.device)
                logits = model(batch, pos)[:, :-1].float()
                target = batch[:, 1:]
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                         reduction="sum").item()
                count += target.numel()
        return total, count

    def throughput(self, handle: Handle, spec) -> dict:
        """Per batch size: prefill `prompt_len` seeded random tokens per sequence, then `gen_len - 1` greedy
        decode steps (CUDA-graph replays on a GPU). Kernel sets that differ by batch size reload the model."""
        import torch

        results, kernels_by_batch = {}, {}
        gen = torch.Generator().manual_seed(0)
        h = handle
        if h.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for b in spec.batch_sizes:
            want = kernel_set(h.device, b)
            if not h.pinned and {**h.kernels, "attention": want["attention"]} == want:
                h.model.set_attention(want["attention"])  # the decode attention needs no reload
                h.kernels, h.used = want, {**h.used, "attention": [want["attention"]]}
            if h.device == "cuda" and want != h.kernels and not h.pinned:
                h.model = None
                torch.cuda.empty_cache()
                h = self.load(h.path, ".", batch_size=b, kernels=want, compile=h.compiled)
            ids = torch.randint(0, h.model.config.vocab_size, (b, spec.prompt_len), generator=gen).to(h.device)
            results[str(b)] = _time_batch(h, ids, spec)
            kernels_by_batch[str(b)] = h.used
            h.model.drop_cache()
        peak = torch.cuda.max_memory_allocated() / 2**20 if h.device == "cuda" else None
        method = "regional torch.compile + one CUDA graph per decode step" if h.compiled else "eager"
        return speed_record(self.describe(h), results, spec, peak, "cuda allocated",
                            kernels_by_batch=kernels_by_batch, method=method)

    def describe(self, handle: Handle) -> dict:
        return {"engine": ENGINE, "device": device_label(handle.device), "host": socket.gethostname(),
                "dtype": str(handle.dtype).removeprefix("torch."), "layout": handle.layout,
                "kernels": handle.used, "kernel_versions": _kernel_versions(), "versions": library_versions()}


def _fuse(linears: dict, other: dict, n_layers: int, kinds: set) -> set:
    """q/k/v and gate/up as one linear each where `kinds` allows (kernels/fuse.py); a dense artifact's linears
    come as plain tensors in `other` and are taken into `linears` for that."""
    from quantkit.evaluation.kernels.fuse import GROUPS, fuse_layers

    if "dense" in kinds:
        for i in range(n_layers):
            for member in (m for ms in GROUPS.values() for m in ms):
                name = f"model.layers.{i}.{member}"
                if name not in linears and f"{name}.weight" in other:
                    linears[name] = QuantWeight("dense", weight=other.pop(f"{name}.weight"),
                                                bias=other.pop(f"{name}.bias", None))
    return fuse_layers(linears, n_layers, kinds) if kinds else set()


def _decode_graph(h: Handle, b: int, prompt_len: int):
    """One decode step as a function of static buffers (ids, pos): forward, argmax, write the token back into
    `ids` and advance `pos`. On a GPU it is captured once into a CUDA graph and replayed."""
    import torch

    ids = torch.zeros(b, 1, dtype=torch.long, device=h.device)
    pos = torch.full((1,), prompt_len, dtype=torch.long, device=h.device)

    def step():
        nxt = h.model(ids, pos, last_only=True)[:, -1].argmax(-1, keepdim=True)
        ids.copy_(nxt)
        pos.add_(1)

    if h.device != "cuda":
        return ids, pos, step
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compile, autotune and warm up outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return ids, pos, graph.replay


def _time_batch(h: Handle, ids, spec) -> dict:
    import torch

    b, p = ids.shape
    h.model.setup_cache(b, p + max(spec.gen_len, 4), h.dtype, h.device)  # the graph warm-up writes 3 steps
    sync = torch.cuda.synchronize if h.device == "cuda" else (lambda: None)
    prefill_pos = torch.arange(p, device=h.device)
    ttft, prefill, decode = [], [], []
    with torch.inference_mode():
        tok, pos, replay = _decode_graph(h, b, p)
        for rep in range(spec.warmup + spec.repetitions):
            sync()
            t0 = time.perf_counter()
            tok.copy_(h.model(ids, prefill_pos, last_only=True)[:, -1].argmax(-1, keepdim=True))
            pos.fill_(p)
            sync()
            t1 = time.perf_counter()
            for _ in range(spec.gen_len - 1):
                replay()
            sync()
            t2 = time.perf_counter()
            if rep >= spec.warmup:
                ttft.append(t1 - t0)
                prefill.append(b * p / (t1 - t0))
                decode.append(b * (spec.gen_len - 1) / (t2 - t1))
    q = statistics.quantiles(ttft, n=100, method="inclusive") if len(ttft) > 1 else ttft * 99
    return {"prefill_tok_s": round(statistics.median(prefill), 1), "decode_tok_s": round(statistics.median(decode), 2),
            "ttft_p50_s": round(statistics.median(ttft), 4), "ttft_p99_s": round(q[98], 4)}


__all__ = ["TorchCompiledEngine", "NotServed", "QuantWeight"]
