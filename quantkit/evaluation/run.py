"""Which measurements a build wants, and taking them with an artifact's engine.

A measurement is a record with `kind` (perplexity | throughput), a `key` covering everything that decides
its meaning (protocol, dataset bytes, tokenizer, settings), and the number(s). Records live in the manifest
(`metrics`) or, when added after publishing, as store eval records; both merge the same way
(quantkit.store.manifest.merge: the newest record of a kind wins).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from quantkit.evaluation.engines import get_engine
from quantkit.evaluation.perplexity import make_windows, perplexity, window_key
from quantkit.sources.remote_code import refuse_remote_code
from quantkit.evaluation.roofline import decode_bound, memory_bandwidth, weight_bytes
from quantkit.util import sha256_json


@dataclass(frozen=True)
class Want:
    kind: str
    name: str  # dataset for perplexity; "throughput"
    key: str


def wanted(ctx) -> list[Want]:
    ev = ctx.recipe.eval
    out = []
    if ev.perplexity:
        p = ev.perplexity
        out += [Want("perplexity", d, window_key(d, ctx.tokenizer_fingerprint, p.seq_len, p.max_windows))
                for d in p.datasets]
    if ev.throughput:
        out.append(Want("throughput", "throughput", sha256_json({"throughput": ev.throughput.model_dump()})))
    return out


def measurable(engine_name: str, wants: list[Want]) -> list[Want]:
    """The wants this engine can take: one without a throughput method (modelopt-dequant) never records a
    throughput, so asking again on every cached build would reload the artifact for nothing."""
    engine = get_engine(engine_name)
    return [w for w in wants if w.kind != "throughput" or hasattr(engine, "throughput")]


def have_keys(metrics: dict) -> set[str]:
    keys = {m.get("key") for m in metrics.get("perplexity", {}).values()}
    if "throughput" in metrics:
        keys.add(metrics["throughput"].get("key"))
    return keys


def evaluate(ctx, engine_name: str, path: Path, entry: str, wants: list[Want], console) -> list[dict]:
    """Load the artifact once in its engine and take every wanted measurement."""
    engine = get_engine(engine_name)
    can = measurable(engine_name, wants)
    for w in wants:
        if w not in can:
            console.print(f"  {w.name}: engine {engine_name} cannot measure it; skipped")
    wants = can
    if not wants:
        return []
    # the recipe's remote-code switch holds in every engine: passed on, and enforced around the load
    allowed = ctx.recipe.model.trust_remote_code
    with refuse_remote_code(allowed):
        handle = engine.load(path, entry, dtype=ctx.recipe.model.dtype, trust_remote_code=allowed)
    records = []
    for w in wants:
        if w.kind == "perplexity":
            p = ctx.recipe.eval.perplexity
            windows = make_windows(w.name, ctx.tokenizer, ctx.tokenizer_fingerprint, p.seq_len, p.max_windows)
            r = perplexity(engine, handle, windows, batch_size=p.batch_size)
            console.print(f"  {w.name}: ppl {r['ppl']:.3f} ({r['windows']} x {p.seq_len} tokens, "
                          f"{r['wall_s']:.0f} s, {engine_name})", highlight=False)
        else:
            r = engine.throughput(handle, ctx.recipe.eval.throughput)
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
    del handle
    return records
