"""Which measurements a build wants, and taking them with an artifact's engine.

A measurement is a record with `kind` (perplexity | throughput), a `key` covering everything that decides
its meaning (protocol, dataset bytes, tokenizer, settings), and the number(s). Records live in the manifest
(`metrics`) or, when added after publishing, as store eval records; both merge the same way
(quantkit.store.manifest.merge: the newest record of a kind wins).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from quantkit.evaluation.engines import get_engine, speed_engine
from quantkit.evaluation.perplexity import make_windows, perplexity, window_key
from quantkit.sources.remote_code import refuse_remote_code
from quantkit.evaluation.roofline import decode_bound, memory_bandwidth, weight_bytes
from quantkit.util import library_versions, sha256_json


@dataclass(frozen=True)
class Want:
    kind: str
    name: str  # dataset for perplexity; "throughput"
    key: str
    engine: str = ""  # throughput: the engine that will time it (set by `measurable`, part of the key)


def wanted(ctx) -> list[Want]:
    ev = ctx.recipe.eval
    out = []
    if ev.perplexity and not ctx.source.dummy:  # random weights: a perplexity would measure nothing
        p = ev.perplexity
        out += [Want("perplexity", d, window_key(d, ctx.tokenizer_fingerprint, p.seq_len, p.max_windows))
                for d in p.datasets]
    if ev.throughput:
        out.append(Want("throughput", "throughput", sha256_json({"throughput": ev.throughput.model_dump(),
                                                                 **speed_context()})))
    return out


def hardware() -> str:
    """The machine as what it is (CPU model, cores, architecture), not by its name: keys hold no host names,
    so CI runners with other names but the same hardware share measurements (the host is in each record)."""
    import platform

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{model or platform.processor() or 'cpu'} x{os.cpu_count()} {platform.machine()}"


def speed_context() -> dict:
    """What a speed number depends on besides the artifact and the engine: the device by name, the hardware,
    and the versions of the libraries the kernels come from (with the kernel choice data shipped with them)."""
    from quantkit.evaluation.kernels.choices import data_fingerprint

    try:
        import torch

        device = f"cuda:{torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"
    except ImportError:
        device = "cpu"
    return {"device": device, "hardware": hardware(), "kernel_data": data_fingerprint(),
            "versions": library_versions(("torch", "transformers", "triton", "gemlite", "llama-cpp-python"))}


def measurable(engine_name: str, wants: list[Want]) -> list[Want]:
    """The wants that can be taken for an artifact of this engine, with throughput keyed by the engine that
    will time it (`speed_engine`): none can (modelopt-dequant on a CPU) -> no throughput want, so a cached
    build does not reload the artifact for nothing; another engine or other hardware -> another key."""
    out = []
    for w in wants:
        if w.kind != "throughput" or w.engine:
            out.append(w)
        elif (speed := speed_engine(engine_name)) is not None:
            out.append(Want(w.kind, w.name, sha256_json({"want": w.key, "engine": speed.name}), speed.name))
    return out


def have_keys(metrics: dict) -> set[str]:
    keys = {m.get("key") for m in metrics.get("perplexity", {}).values()}
    if "throughput" in metrics:
        keys.add(metrics["throughput"].get("key"))
    return keys


def evaluate(ctx, engine_name: str, path: Path, entry: str, wants: list[Want], console) -> list[dict]:
    """Perplexity in the artifact's own engine, then throughput in its speed engine (`speed_engine`: the
    compiled engine on a GPU host); one model in memory at a time."""
    engine = get_engine(engine_name)
    can = measurable(engine_name, wants)
    for w in wants:
        if not any(c.name == w.name for c in can):
            console.print(f"  {w.name}: no engine here can measure a {engine_name} artifact; skipped")
    wants = can
    if not wants:
        return []
    records = []
    ppl = [w for w in wants if w.kind == "perplexity"]
    handle = _load(ctx, engine, path, entry) if ppl else None
    for w in ppl:
        p = ctx.recipe.eval.perplexity
        windows = make_windows(w.name, ctx.tokenizer, ctx.tokenizer_fingerprint, p.seq_len, p.max_windows)
        r = perplexity(engine, handle, windows, batch_size=p.batch_size)
        console.print(f"  {w.name}: ppl {r['ppl']:.3f} ({r['windows']} x {p.seq_len} tokens, "
                      f"{r['wall_s']:.0f} s, {engine_name})", highlight=False)
        records.append({**r, "kind": w.kind, "key": w.key})
    # one model in memory at a time: a speed engine other than this one loads its own below; the same engine
    # (the CPU case) times the model already loaded instead of decompressing the artifact a second time
    if speed_engine(engine_name) is not engine:
        handle = None
    for w in wants:
        if w.kind == "throughput":
            r = _throughput(ctx, engine_name, path, entry, console, handle)
            handle = None
            if r is None:
                continue
            r.setdefault("host", socket.gethostname())  # every speed record names its host (provenance)
            # a dense source is read at the dtype it was loaded in (fp32 file evaluated as bf16 on a GPU)
            dense = Path(entry).is_absolute() and Path(entry) == ctx.source.path
            itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}.get(r.get("dtype")) if dense else None
            wb, bw = weight_bytes(Path(path), entry, itemsize), memory_bandwidth()
            bound = decode_bound(wb, bw)
            b1 = r["batches"].get("1")
            r["roofline"] = {**wb, "bandwidth": bw, "decode_bound_tok_s": round(bound, 1),
                             "decode_pct_of_bound": round(100 * b1["decode_tok_s"] / bound, 3) if b1 else None}
            first = next(iter(r["batches"].values()))
            console.print(f"  throughput ({r['engine']}): prefill {first['prefill_tok_s']:.0f} tok/s, decode "
                          f"{first['decode_tok_s']:.1f} tok/s (bound {bound:.0f})", highlight=False)
            records.append({**r, "kind": w.kind, "key": w.key})
    return records


def _load(ctx, engine, path: Path, entry: str):
    """The recipe's remote-code switch holds in every engine: passed on, and enforced around the load."""
    allowed = ctx.recipe.model.trust_remote_code
    with refuse_remote_code(allowed):
        return engine.load(path, entry, dtype=ctx.recipe.model.dtype, trust_remote_code=allowed)


def _throughput(ctx, engine_name: str, path: Path, entry: str, console, loaded=None) -> dict | None:
    """Time the artifact in its speed engine (`loaded`: that engine's handle, when already loaded); an artifact
    that engine has no kernel for (it raises `NotServed`) is timed by its own engine, and the record says why."""
    from quantkit.evaluation.kernels.weights import NotServed

    speed = speed_engine(engine_name)
    try:
        handle = loaded if loaded is not None else _load(ctx, speed, path, entry)
    except NotServed as e:
        own = get_engine(engine_name)
        if speed is own or not hasattr(own, "throughput"):
            console.print(f"  throughput: {speed.name} cannot serve it ({e}) and {engine_name} times nothing; "
                          "not measured", highlight=False)
            return None
        console.print(f"  throughput: {speed.name} cannot serve it ({e}); timed by {engine_name}")
        handle, speed = _load(ctx, own, path, entry), own
        return {**speed.throughput(handle, ctx.recipe.eval.throughput), "fallback_reason": str(e)}
    return speed.throughput(handle, ctx.recipe.eval.throughput)
