"""Distributed calibration against one process (issue 10, part 4): the same GPTQ target built by `quantkit build`
with `model.gpus: 1` and with `model.gpus: N` (llm-compressor's distributed oneshot, one process per GPU,
started by quantkit), each in a fresh process: wall time, speed-up, peak host RSS, peak GPU memory per GPU,
and how far the two artifacts are apart (every quantized layer dequantized; the integer codes; the
unquantized tensors), plus perplexity where the model is real.

    python scripts/bench_distributed.py --out DIR [--source dummy:llama-3.1-8b --layers 6] [--samples 128
        --seq-len 2048] [--gpus 2] [--group 128] [--dtype bfloat16] [--ppl N_WINDOWS]

On a host without CUDA the N processes are CPU ranks on gloo (QUANTKIT_CPU_RANKS): the same launcher and
library code, used here to prove the numbers and to dry-run this script. The source's weights and the
calibration set are made before either timed build, so neither pays for them. Writes DIR/results.json and
DIR/summary.md; prints the summary.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_recipe(work: Path, gpus: int, a) -> Path:
    dummy = a.source.startswith("dummy:")
    layers = f", layers: {a.layers}" if dummy and a.layers else ""
    source = a.source if dummy else str(Path(a.source).resolve())  # the recipe lives in the work folder
    ppl = (f"{{perplexity: {{datasets: [wikitext2], seq_len: 512, max_windows: {a.ppl}}}}}" if a.ppl
           else "{perplexity: null}")
    p = work / f"dist-g{gpus}.yaml"
    p.write_text(f"""name: dist-g{gpus}
model: {{source: "{source}"{layers}, dtype: {a.dtype}, gpus: {gpus}}}
calibration: {{dataset: c4, num_samples: {a.samples}, seq_len: {a.seq_len}, seed: 0}}
baseline: false
targets:
  - {{name: gptq-w4-g{a.group}, format: gptq, bits: 4, group_size: {a.group}, indivisible: fallback}}
eval: {ppl}
store: {{uri: {work / f"store-g{gpus}"}}}
""")
    return p


def prepare(recipe: Path, work: Path) -> dict:
    """Materialize the source (dummy weights are drawn once) and the calibration set into the cache."""
    from quantkit.context import BuildContext
    from quantkit.recipe.loader import load_recipe
    from quantkit.sources.resolve import resolve_source

    t0 = time.perf_counter()
    loaded = load_recipe(recipe)
    ctx = BuildContext(loaded, resolve_source(loaded.recipe.model, base_dir=loaded.path.parent), work)
    calib = ctx.calibration
    return {"source_dir": ctx.source.path.name, "weight_bytes": ctx.weight_bytes,
            "prepare_s": round(time.perf_counter() - t0, 1),
            "calibration_tokens": [calib.meta["num_samples"], calib.meta["seq_len"]]}


class GpuSampler:
    """nvidia-smi's memory.used per GPU every 0.2 s (whole processes, CUDA context included), max kept."""

    def __init__(self):
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.TimeoutExpired):
                return
            for line in out.strip().splitlines():
                i, mib = (int(x) for x in line.split(","))
                self.peak[i] = max(self.peak.get(i, 0), mib * 2**20)
            self._stop.wait(0.2)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=15)


def build(recipe: Path, env: dict, log: Path, cuda: bool, no_sanity: bool = False) -> dict:
    t0 = time.perf_counter()
    sampler = GpuSampler() if cuda else None
    if sampler:
        sampler.__enter__()
    try:
        p = subprocess.run([sys.executable, str(ROOT / "scripts/build_peak.py"), "build", str(recipe),
                            *(["--no-sanity-check"] if no_sanity else [])],
                           capture_output=True, text=True, env=env, cwd=ROOT)
    finally:
        if sampler:
            sampler.__exit__()
    log.write_text(p.stdout + p.stderr)
    rec = json.loads(p.stderr.strip().splitlines()[-1])
    if rec["exit"] != 0:
        sys.exit(f"{recipe.name} failed (log {log}):\n{p.stderr[-3000:]}")
    rec["process_wall_s"] = round(time.perf_counter() - t0, 2)
    m = re.search(r"produced in ([\d.]+) s", p.stderr)
    rec["produce_s"] = float(m.group(1)) if m else None
    if sampler:
        rec["nvidia_smi_peak_used"] = {f"cuda:{i}": v for i, v in sorted(sampler.peak.items())}
    return rec


def artifact(store: Path) -> tuple[dict, Path]:
    """The one GPTQ artifact of a store, pulled (hash-checked) into a directory beside it."""
    from quantkit.store.store import Store

    st = Store(str(store))
    m = next(m for m in st.list() if m["target"]["name"].startswith("gptq"))
    return m, st.materialize(m["id"], store.parent / f"pulled-{store.name}")


def compare(a: Path, b: Path) -> dict:
    """Every quantized layer dequantized (max |difference|, per layer relative to its norm, codes that differ)
    and every other tensor (largest |difference|)."""
    import torch

    from quantkit.formats.layouts.compressed_tensors import dequantize, read_compressed_tensors

    la, ra = read_compressed_tensors(a)
    lb, rb = read_compressed_tensors(b)
    assert sorted(la) == sorted(lb) and sorted(ra) == sorted(rb), "the two artifacts hold different tensors"
    worst_rel, worst_abs, worst_layer, codes_diff, codes = 0.0, 0.0, None, 0, 0
    scale_rel = 0.0
    for name in sorted(la):
        x, y = dequantize(la[name]).float(), dequantize(lb[name]).float()
        d = (x - y).abs().max().item()
        rel = ((x - y).norm() / x.norm()).item()
        if rel >= worst_rel:
            worst_rel, worst_layer = rel, name
        worst_abs = max(worst_abs, d)
        codes_diff += int((la[name].q != lb[name].q).sum())
        codes += la[name].q.numel()
        sa, sb = la[name].scale.float(), lb[name].scale.float()
        scale_rel = max(scale_rel, ((sa - sb).abs() / sa.abs().clamp_min(1e-12)).max().item())
    rest = max(((ra[k].float() - rb[k].float()).abs().max().item() for k in ra if ra[k].is_floating_point()),
               default=0.0)
    return {"quantized_layers": len(la), "max_abs_weight_diff": worst_abs, "max_rel_layer_diff": worst_rel,
            "worst_layer": worst_layer, "codes_differing": codes_diff, "codes": codes,
            "codes_differing_pct": round(100 * codes_diff / max(codes, 1), 5), "max_rel_scale_diff": scale_rel,
            "other_tensors_max_abs_diff": rest}


def fmt_gb(b) -> str:
    return f"{b / 1e9:.2f}" if b else "-"


def summary(res: dict) -> str:
    r1, rn = res["runs"]["1"], res["runs"][str(res["gpus"])]
    c = res["compare"]
    lines = [f"# Distributed calibration: {res['gpus']} processes vs 1 ({res['device']})", "",
             f"`{' '.join(res['argv'])}`", "",
             f"Source {res['source']} ({res['weight_bytes'] / 1e9:.2f} GB at {res['dtype']}), GPTQ W4 group "
             f"{res['group']}, calibration {res['calibration']}.", "",
             "| gpus | process wall s | produce s | peak host RSS GB (parent) | peak GPU GB per GPU | ppl |",
             "|---|---|---|---|---|---|"]
    for n, r in res["runs"].items():
        gpu = r.get("gpu_per_device") or {}
        gtxt = ", ".join(f"{k} {fmt_gb(v)}" for k, v in gpu.items()) or "-"
        lines.append(f"| {n} | {r['process_wall_s']} | {r['produce_s']} | {fmt_gb(r['vmhwm'])} | {gtxt} | "
                     f"{r.get('ppl') or '-'} |")
    span = (f"; produce span: {r1['produce_s'] / rn['produce_s']:.3f}" if r1["produce_s"] and rn["produce_s"]
            else "")
    smi = {n: r["nvidia_smi_peak_used"] for n, r in res["runs"].items() if r.get("nvidia_smi_peak_used")}
    lines += ["", f"- speed-up (process wall): {r1['process_wall_s'] / rn['process_wall_s']:.3f}{span}",
              f"- ranks: {rn.get('ranks', '-')}",
              *([f"- nvidia-smi peak memory.used (whole processes, CUDA contexts included): " + "; ".join(
                  f"gpus {n}: " + ", ".join(f"{d} {fmt_gb(v)} GB" for d, v in per.items()) for n, per in smi.items())]
                if smi else []),
              f"- artifacts: {c['quantized_layers']} quantized layers; max |weight difference| "
              f"{c['max_abs_weight_diff']:.3g}; worst layer {c['worst_layer']} differs by "
              f"{100 * c['max_rel_layer_diff']:.4f}% of its norm; {c['codes_differing']} of {c['codes']} integer "
              f"codes differ ({c['codes_differing_pct']}%); scales within {c['max_rel_scale_diff']:.3g} "
              f"(relative); other tensors within {c['other_tensors_max_abs_diff']:.3g}"]
    if r1.get("ppl") and rn.get("ppl"):
        lines.append(f"- perplexity (wikitext2): {r1['ppl']:.4f} vs {rn['ppl']:.4f}: "
                     f"{100 * (rn['ppl'] / r1['ppl'] - 1):+.4f}%")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--source", default="dummy:llama-3.1-8b")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--ppl", type=int, default=0, help="wikitext2 windows of 512 tokens (real models)")
    ap.add_argument("--logs", action="store_true", help="build logs into --out (default: the work folder)")
    ap.add_argument("--no-sanity-check", action="store_true", help="skip the baseline check (the same in both)")
    a = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    work = Path(os.environ.get("DIST_WORK", "/tmp/bench-distributed"))
    work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if not cuda:
        env["QUANTKIT_CPU_RANKS"] = str(a.gpus)  # gloo processes stand in for the GPUs
    recipes = {n: write_recipe(work, n, a) for n in (1, a.gpus)}
    prep = prepare(recipes[1], work)
    print("prepared:", json.dumps(prep), flush=True)
    res = {"argv": ["python", "scripts/bench_distributed.py", *sys.argv[1:]], "gpus": a.gpus, "group": a.group,
           "dtype": a.dtype, "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)",
           "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
           "libraries": libraries(), **prep, "runs": {}}
    res["source"] = (a.source + f" x {a.layers} layers" if a.source.startswith("dummy:") else Path(a.source).name)
    res["calibration"] = f"C4 {a.samples} x {a.seq_len}"
    pulled = {}
    for n, recipe in recipes.items():
        store = work / f"store-g{n}"
        subprocess.run(["rm", "-rf", str(store), str(work / f"pulled-store-g{n}")], check=True)
        rec = build(recipe, env, (a.out if a.logs else work) / f"build-g{n}.log", cuda, a.no_sanity_check)
        manifest, pulled[n] = artifact(store)
        devices = manifest["build"].get("devices", {})
        rec["devices"] = devices
        if n == 1 and rec.get("gpu_peak_allocated"):
            rec["gpu_per_device"] = {"cuda:0": rec["gpu_peak_allocated"]}
        if "ranks" in devices:
            rec["ranks"] = devices["ranks"]
            peaks = re.findall(r"rank \d+ (cuda:\d+)[^;]*GPU peak ([\d.]+) GB", devices["ranks"])
            if peaks:
                rec["gpu_per_device"] = {d: float(g) * 1e9 for d, g in peaks}
        ppl = manifest.get("metrics", {}).get("perplexity", {}).get("wikitext2")
        rec["ppl"] = ppl and ppl["ppl"]
        res["runs"][str(n)] = rec
        (a.out / "results.json").write_text(json.dumps(res, indent=1))  # what a later timeout leaves
        print(f"gpus {n}:", json.dumps({k: v for k, v in rec.items() if k != "devices"}), flush=True)
    res["compare"] = compare(pulled[1], pulled[a.gpus])
    (a.out / "results.json").write_text(json.dumps(res, indent=1))
    text = summary(res)
    (a.out / "summary.md").write_text(text)
    print(text, flush=True)
    return 0


def libraries() -> dict:
    from importlib.metadata import version

    return {n: version(n) for n in ("torch", "transformers", "llmcompressor", "compressed-tensors")}


if __name__ == "__main__":
    sys.exit(main())
