"""What one batch-1 decode step of the compiled engine could cost on this GPU, part by part (issue 11, W4A16 >= 1.8x):

1. decode attention: every variant of quantkit/evaluation/kernels/attention.py over 32 layers of Llama-3.1-8B
   attention (32 query heads, 8 KV heads, head dim 128) against a static cache of --cache slots (2048 + 16),
   batch 1 / 16 / 64; each variant `torch.compile`d as the engine compiles its layers, the 32 layers captured
   in one CUDA graph, ms per replayed step (CUDA events); plus the SDPA backend torch dispatches to, the error
   against the fp32 reference and the floor (K/V bytes / measured copy bandwidth).
2. W4 GEMV at 1 token: one decoder layer's four (fused) linears, 32 times per step over 4 distinct weight
   copies (beyond L2), for every int4 kernel of kernels/linear.py: tinygemm with 8/4/2 inner K tiles, gemlite's
   GEMV_REVSPLITK / GEMV_SPLITK / GEMV (group 128 and 64), the inductor-fused dequant over bytes and over
   int32 words (each also with inductor's coordinate-descent tuning), and bf16 cuBLAS.
Then it writes $OUT/choices.json: the committed kernel table with the fastest measured attention per batch and
the fastest int4 kernel at 1 token (group 128, error < 2 %), for the engine run that follows
(`QUANTKIT_KERNEL_CHOICES=$OUT/choices.json scripts/bench_engine_gpu.py ...`) and for data/choices.json.

  python scripts/bench_decode_attention.py --out $OUT                         # on the GPU (~2 min)
  python scripts/bench_decode_attention.py --dry-run --device cpu --layers 2  # the logic on a CPU, tiny shapes
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quantkit.evaluation.kernels.attention import VARIANTS, decode_attention, decode_mask  # noqa: E402

LLAMA8B = {"heads": 32, "kv": 8, "head_dim": 128,
           "linears": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}}
TINY = {"heads": 8, "kv": 2, "head_dim": 64, "linears": {"qkv": (384, 256), "o": (256, 256), "down": (256, 512)}}
# "+cdt": compiled with inductor's coordinate-descent tuning of its kernel configs (what gpt-fast turns on).
# CORE first; EXTRA (gemlite kernels its shipped H200 cache does not cover: they autotune, ~minutes) only
# while the time budget lasts.
INT4_CORE = [("tinygemm", 128), ("tinygemm-k4", 128), ("inductor+cdt", 128), ("inductor-i32", 128),
             ("inductor-i32+cdt", 128), ("gemlite", 128)]
INT4_EXTRA = [("tinygemm-k2", 128), ("inductor", 128), ("inductor-i32+cdt", 64), ("gemlite", 64),
              ("gemlite-GEMV_SPLITK", 128), ("gemlite-GEMV", 128),
              ("gemlite-GEMV_SPLITK", 64), ("gemlite-GEMV", 64)]


def timed(step, dev: str, reps: int, iters: int) -> float:
    """ms per call of `step`: on a GPU captured once in a CUDA graph and replayed (median of reps x iters)."""
    if dev != "cuda":
        step()
        t0 = time.perf_counter()
        step()
        return (time.perf_counter() - t0) * 1e3
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # compile, autotune, warm up outside the capture
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    out = []
    for _ in range(reps):
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        graph.replay()
        ev[0].record()
        for _ in range(iters):
            graph.replay()
        ev[1].record()
        torch.cuda.synchronize()
        out.append(ev[0].elapsed_time(ev[1]) / iters)
    del graph
    return statistics.median(out)


def sdpa_backend(variant: str, q, k, v, mask) -> str | None:
    """The backend torch's SDPA dispatcher picks for a variant's call (None: not an SDPA variant)."""
    from torch.nn.attention import SDPBackend

    b, h, _, d = q.shape
    g = h // k.shape[1]
    args = {"sdpa-gqa": (q, k, v, {"enable_gqa": g > 1}), "sdpa-grouped": (q.view(b, -1, g, d), k, v, {}),
            "sdpa-repeat": (q, k[:, :, :8].repeat_interleave(g, 1), v[:, :, :8].repeat_interleave(g, 1), {})}
    if variant not in args:
        return None
    qq, kk, vv, kw = args[variant]
    m = mask if kk.shape[2] == mask.shape[-1] else mask[..., : kk.shape[2]]
    try:
        return SDPBackend(torch._fused_sdp_choice(qq, kk, vv, attn_mask=m, **kw)).name
    except Exception as e:  # older/newer signature: say so rather than fail the measurement
        return f"? ({type(e).__name__})"


def bench_attention(args, cfg, dev, batch: int, variants, bw_gb_s: float, deadline: float) -> list[dict]:
    layers, length, dt = args.layers, args.cache, torch.bfloat16 if dev == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (batch, cfg["kv"], length, cfg["head_dim"])
    caches = [(torch.randn(shape, generator=g, device=dev, dtype=dt), torch.randn(shape, generator=g, device=dev,
                                                                                   dtype=dt)) for _ in range(layers)]
    qs = torch.randn(layers, batch, cfg["heads"], 1, cfg["head_dim"], generator=g, device=dev, dtype=dt)
    outs = torch.empty_like(qs)
    pos = torch.tensor([length - 8], device=dev)
    mask = decode_mask(pos, length, dt)
    ref = decode_attention("matmul", qs[0].float(), caches[0][0].float(), caches[0][1].float(), pos, mask)
    floor_ms = layers * 2 * caches[0][0].numel() * caches[0][0].element_size() / (bw_gb_s * 1e9) * 1e3
    rows = []
    for variant in variants:
        if time.perf_counter() > deadline:
            rows.append({"part": "attention", "variant": variant, "batch": batch, "skipped": "time budget"})
            continue
        t0 = time.perf_counter()
        torch._dynamo.reset()  # no compiled code of an earlier variant may serve this one
        rec = {"part": "attention", "variant": variant, "batch": batch, "cache": length, "layers": layers,
               "floor_ms": round(floor_ms, 4), "sdpa_backend": sdpa_backend(variant, qs[0], *caches[0], mask)}
        try:
            fn = lambda q, k, v, p, m, _v=variant: decode_attention(_v, q, k, v, p, m)  # noqa: E731
            attn = torch.compile(fn, fullgraph=True, dynamic=False) if dev == "cuda" else fn

            def step():
                m = decode_mask(pos, length, dt)
                for i in range(layers):
                    outs[i].copy_(attn(qs[i], caches[i][0], caches[i][1], pos, m))

            rec["ms_per_step"] = round(timed(step, dev, args.reps, args.iters), 4)
            rec["rel_err"] = round(float((outs[0].float() - ref).norm() / ref.norm()), 5)
        except Exception as e:  # one variant failing (backend, compile) must not cost the others
            rec["error"] = f"{type(e).__name__}: {e}"[:400]
        rec["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(rec)
        print(json.dumps(rec), flush=True)
    del caches
    return rows


def bench_gemv(args, cfg, dev, kernels, bw_gb_s: float, deadline: float) -> list[dict]:
    from quantkit.evaluation.kernels.linear import Int4Linear
    from quantkit.evaluation.kernels.weights import QuantWeight

    dt = torch.bfloat16
    copies = 4 if dev == "cuda" else 1
    g = torch.Generator(device=dev).manual_seed(1)
    xs = {n: torch.randn(1, k, generator=g, device=dev, dtype=dt) for n, (_, k) in cfg["linears"].items()}
    params = sum(n * k for n, k in cfg["linears"].values())
    rows = []
    for kernel, group in [kg for kg in kernels if dev == "cuda" or not kg[0].startswith("gemlite")]:
        if time.perf_counter() > deadline:
            rows.append({"part": "gemv", "kernel": kernel, "group": group, "skipped": "time budget"})
            continue
        t0 = time.perf_counter()
        torch._dynamo.reset()  # dynamo's guards ignore inductor settings: "+cdt" must compile afresh
        rec = {"part": "gemv", "kernel": kernel, "group": group, "rows": 1, "layers": args.layers}
        if kernel.startswith("gemlite") and args.gemlite_autotune:
            rec["gemlite_autotune"] = args.gemlite_autotune
        try:
            mods, err = [], 0.0
            for c in range(copies):
                layer = {}
                for name, (n, k) in cfg["linears"].items():
                    if kernel == "bf16":
                        w = torch.randn(n, k, generator=g, device=dev, dtype=dt) * 0.02
                        layer[name] = lambda x, _w=w: torch.nn.functional.linear(x, _w)
                        continue
                    qw = QuantWeight("int4", q=torch.randint(0, 16, (n, k), generator=g, device=dev,
                                                             dtype=torch.uint8),
                                     scale=torch.rand(n, k // group, generator=g, device=dev) * 0.002 + 1e-4,
                                     zero=torch.randint(0, 16, (n, k // group), generator=g, device=dev).float(),
                                     group_size=group)
                    layer[name] = Int4Linear(qw, dev, dt, kernel.removesuffix("+cdt"))
                    if c == 0:
                        want = xs[name].float() @ qw.dequantize().t()
                        got = layer[name](xs[name]).float()
                        err = max(err, float((got - want).norm() / want.norm()))
                    del qw
                mods.append(layer)

            if dev == "cuda" and kernel.startswith("inductor"):  # compiled as the engine compiles its layers
                for layer in mods:
                    for m in layer.values():
                        m.compile(fullgraph=True, dynamic=False)

            def step():
                for i in range(args.layers):
                    layer = mods[i % copies]
                    for n in cfg["linears"]:
                        layer[n](xs[n])

            import torch._inductor.config as inductor_config

            with inductor_config.patch(coordinate_descent_tuning=kernel.endswith("+cdt")):
                rec["ms_per_step"] = round(timed(step, dev, args.reps, args.iters), 4)
            nbytes = params * (2 if kernel == "bf16" else 0.5 + 4 / group)  # int4 + bf16 scale and zero per group
            rec["floor_ms"] = round(args.layers * nbytes / (bw_gb_s * 1e9) * 1e3, 4)
            rec["gb_per_s"] = round(args.layers * nbytes / (rec["ms_per_step"] * 1e-3) / 1e9, 1)
            rec["rel_err"] = round(err, 5)
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"[:400]
        rec["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(rec)
        print(json.dumps(rec), flush=True)
        mods = None
        if dev == "cuda":
            torch.cuda.empty_cache()
    return rows


GEMV_TYPES = ("GEMV", "GEMV_REVSPLITK", "GEMV_SPLITK")


def retune_gemlite(mode: str) -> None:
    """Forget the cached configs of gemlite's GEMV kernels and let them autotune in `mode` on first use (the
    shipped H200 cache came from gemlite's "fast" search)."""
    import gemlite
    from gemlite import core

    for t in GEMV_TYPES:
        core.GEMLITE_TRITON_CONFIG_CACHE.pop(t, None)
    gemlite.set_autotune({t: mode for t in GEMV_TYPES})


def choose(rows: list[dict], base: dict, gpu: str, batches=(1, 16, 64)) -> dict:
    """The committed table for this GPU with the measured winners: attention per batch (error < 1 %; a batch
    size not measured keeps the reference "matmul", not the choice of a smaller one), int4 at 1 token (group
    128, error < 2 %; the larger token counts keep their committed kernels)."""
    table = json.loads(json.dumps(base))
    per_gpu = table.setdefault(gpu, {})
    ok = [r for r in rows if "ms_per_step" in r]
    att = {}
    for b in batches:
        cand = [r for r in ok if r["part"] == "attention" and r["batch"] == b and r["rel_err"] < 1e-2]
        att[str(b)] = min(cand, key=lambda r: r["ms_per_step"])["variant"] if cand else "matmul"
    if any(v != "matmul" for v in att.values()):
        per_gpu["attention"] = att
    gemv = [r for r in ok if r["part"] == "gemv" and r["kernel"] != "bf16" and r["group"] == 128
            and r["rel_err"] < 2e-2]
    if gemv:
        best = min(gemv, key=lambda r: r["ms_per_step"])["kernel"]
        per_gpu.setdefault("int4", {})["1"] = best.removesuffix("+cdt")
        if best.endswith("+cdt"):
            per_gpu["compile"] = {"coordinate_descent_tuning": True}
    table["_source"] = (f"scripts/bench_decode_attention.py on {gpu}: fastest decode attention per batch and int4 "
                        f"kernel at 1 token; the rest as committed. " + base.get("_source", ""))[:2000]
    return table


def write(out: str, rows: list[dict], meta: dict, gpu: str, batches) -> None:
    """$OUT/decode-bench.json (every measurement) and $OUT/choices.json (the table with the winners)."""
    from quantkit.evaluation.kernels.choices import DATA

    if not out:
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "decode-bench.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    table = choose(rows, json.loads((DATA / "choices.json").read_text()), gpu, batches)
    (Path(out) / "choices.json").write_text(json.dumps(table, indent=1))


def print_tables(rows: list[dict]) -> None:
    print("\n| decode attention | batch | ms / step (32 layers) | floor ms | SDPA backend | rel. err | note |")
    print("|---|---|---|---|---|---|---|")
    for r in (r for r in rows if r["part"] == "attention"):
        note = r.get("error") or r.get("skipped") or ""
        print(f"| {r['variant']} | {r['batch']} | {r.get('ms_per_step', '-')} | {r.get('floor_ms', '-')} | "
              f"{r.get('sdpa_backend') or '-'} | {r.get('rel_err', '-')} | {note[:120]} |")
    print("\n| W4 GEMV, 1 token | group | ms / step (32 layers) | floor ms | GB/s | rel. err | note |")
    print("|---|---|---|---|---|---|---|")
    for r in (r for r in rows if r["part"] == "gemv"):
        note = r.get("error") or r.get("skipped") or (f"gemlite autotune {r['gemlite_autotune']}"
                                                        if r.get("gemlite_autotune") else "")
        print(f"| {r['kernel']} | {r['group'] or '-'} | {r.get('ms_per_step', '-')} | {r.get('floor_ms', '-')} | "
              f"{r.get('gb_per_s', '-')} | {r.get('rel_err', '-')} | {note[:120]} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--cache", type=int, default=2048 + 16)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-gemv", action="store_true")
    ap.add_argument("--gemlite-autotune", default="", choices=["", "fast", "max"],
                    help="re-autotune gemlite's GEMV kernels on this GPU (drops their shipped cached configs; "
                    "'max': gemlite's full search, ~20 s per shape) and write the result to $OUT/gemlite-<gpu>.json")
    ap.add_argument("--gemv", default="", help="instead of the core + extra sets: KERNEL:GROUP,... (e.g. "
                    "gemlite-GEMV_SPLITK:128) or 'extra'")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=120, help="later measurements are skipped past this")
    ap.add_argument("--out", default="")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, no compile or CUDA graph (CPU check)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    dev = args.device
    cfg = TINY if args.dry_run else LLAMA8B
    if args.dry_run:
        args.cache, args.reps, args.iters = min(args.cache, 80), 1, 1
    from quantkit.evaluation.kernels.choices import load_gemlite_config
    from quantkit.evaluation.roofline import memory_bandwidth

    gpu = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
    bw = memory_bandwidth() if dev == "cuda" else {"gb_per_s": 50.0}
    versions = {"torch": torch.__version__}
    if dev == "cuda":
        import gemlite
        import triton

        versions.update(triton=triton.__version__, gemlite=getattr(gemlite, "__version__", "?"),
                        gemlite_config=load_gemlite_config())
    print(f"{gpu}; {versions}; copy bandwidth {bw['gb_per_s']} GB/s", flush=True)
    variants = [v for v in args.variants.split(",") if v]
    batches = [int(b) for b in args.batches.split(",")]
    rows = bench_attention(args, cfg, dev, batches[0], variants, bw["gb_per_s"], deadline)  # batch 1 first
    core, extra = [("bf16", None)] + INT4_CORE, INT4_EXTRA
    if args.gemv:
        core = INT4_EXTRA if args.gemv == "extra" else [(k, int(g)) for k, g in
                                                          (x.split(":") for x in args.gemv.split(","))]
        core, extra = [("bf16", None), ("tinygemm", 128)] + core, []  # with the references, same run
    if args.gemlite_autotune and dev == "cuda":
        retune_gemlite(args.gemlite_autotune)
    if not args.no_gemv:
        rows += bench_gemv(args, cfg, dev, core, bw["gb_per_s"], deadline)
    if args.gemlite_autotune and dev == "cuda" and args.out:
        import gemlite

        from quantkit.evaluation.kernels.choices import gpu_slug

        Path(args.out).mkdir(parents=True, exist_ok=True)
        gemlite.cache_config(str(Path(args.out) / f"gemlite-{gpu_slug(gpu)}.json"))
    for b in batches[1:]:
        rows += bench_attention(args, cfg, dev, b, variants, bw["gb_per_s"], deadline)
    meta = {"gpu": gpu, "versions": versions, "bandwidth": bw, "args": vars(args)}
    write(args.out, rows, meta, gpu, batches)  # before the optional part: a killed run keeps the core results
    if not args.no_gemv and extra and time.perf_counter() < deadline:
        rows += bench_gemv(args, cfg, dev, extra, bw["gb_per_s"], deadline)
        write(args.out, rows, meta, gpu, batches)
    print_tables(rows)
    from quantkit.evaluation.kernels.choices import DATA

    table = choose(rows, json.loads((DATA / "choices.json").read_text()), gpu, batches)
    print("\nchoices:", json.dumps(table.get(gpu, {})), flush=True)
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
