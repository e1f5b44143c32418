"""Issue 10's GPU measurements in one time-boxed run: Llama-3.1 shapes with dummy weights (few layers), each
target built by `quantkit build --target` in its own process (wall time, peak host RSS, peak GPU memory, where
each stage ran), llm-compressor's `oneshot` called directly on the same model for the quantkit/direct ratio,
and the build planner's prediction for every run.

    python scripts/bench_scale_gpu.py --out DIR [--deadline 540] [--smoke]

--smoke: a tiny architecture and calibration set, to check the script itself on a CPU. Jobs run in priority
order; a job that would start after the deadline is skipped and listed as not run. Writes DIR/results.json and
DIR/summary.md (the table committed under docs/benchmarks/).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def recipe(path: Path, name: str, source: str, layers: int, samples: int, seq_len: int, store: Path,
           only: set[str] | None = None) -> Path:
    """only: the target names to keep (a recipe with a gguf target needs the llama.cpp tools to load at all)."""
    text = f"""name: {name}
model: {{source: "{source}", layers: {layers}, dtype: bfloat16}}
calibration: {{dataset: c4, num_samples: {samples}, seq_len: {seq_len}, seed: 0}}
baseline: false
targets:
  - {{name: fp8-dynamic, format: fp8, scheme: dynamic}}
  - {{name: gptq-w4-g128, format: gptq, bits: 4, group_size: 128}}
  - {{name: awq-w4-g128, format: awq, group_size: 128}}
  - {{name: int8-w8a8, format: int8, scheme: w8a8}}
  - {{name: fp8-static, format: fp8, scheme: static}}
  - {{name: w4a16-rtn, format: gptq, algorithm: rtn, group_size: 128}}
  - {{name: trtllm-fp8, format: trtllm, scheme: fp8}}
  - {{name: trtllm-int4-awq, format: trtllm, scheme: int4_awq, group_size: 128}}
  - {{name: gguf-q4km, format: gguf, types: [Q4_K_M], imatrix: true, llama_cpp_ppl_chunks: 0}}
eval: {{perplexity: null}}
store: {{uri: {store}}}
"""
    if only is not None:
        text = "\n".join(ln for ln in text.splitlines()
                         if not ln.startswith("  - {name: ") or ln.split(",")[0].split(": ")[1] in only) + "\n"
    path.write_text(text)
    return path


def run(cmd: list[str], log: Path, timeout: float) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(5, timeout), cwd=ROOT)
        out, code = p.stderr, p.returncode
        log.write_text(out + "\n--- stdout ---\n" + p.stdout)  # `--json`'s stage records are on stdout
    except subprocess.TimeoutExpired as e:
        out, code = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or ""), 124
        log.write_text(out)
    rec = {"exit": code, "process_wall_s": round(time.perf_counter() - t0, 2)}
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{") and line.endswith("}"):
            try:
                rec.update(json.loads(line))
                break
            except json.JSONDecodeError:
                continue
    rec["stages"] = [line.strip() for line in out.splitlines()
                     if line.strip().startswith(("calibration:", "quantize:", "imatrix:", "placement:",
                                                 "produced in"))]
    return rec


def calibration_file(samples: int, seq_len: int) -> Path | None:
    """The build's cached calibration set (the same tokens quantkit's targets took)."""
    from safetensors import safe_open

    root = Path(os.environ.get("QUANTKIT_CACHE", Path.home() / ".cache/quantkit")) / "calibration"
    for f in sorted(root.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            if tuple(st.get_slice("input_ids").get_shape()) == (samples, seq_len):
                return f
    return None


def manifest_of(store: Path, target: str) -> dict | None:
    """A GGUF target publishes one artifact per type, named TARGET-TYPE (gguf-q4km-q4_k_m)."""
    for pattern in (f"*.{target}.*.json", f"*.{target}-*.json"):
        for f in sorted((store / "manifests").glob(pattern)):
            return json.loads(f.read_text())
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--deadline", type=float, default=540, help="seconds from start; later jobs are skipped")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--jobs", help="comma list of SHAPE:JOB to run, in this order (default: all, priority order)")
    ap.add_argument("--layers", default="8b:4,70b:2", help="decoder layers per shape, e.g. 8b:4,70b:2")
    a = ap.parse_args()
    start = time.monotonic()
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("SCALE_WORK") or Path(tempfile.gettempdir()) / "scale-work")
    logs = work / "logs"  # the device returns 8 files at most: logs go back as one tarball
    logs.mkdir(parents=True, exist_ok=True)
    if a.smoke:
        tiny = work / "tiny.json"
        cfg = json.loads((ROOT / "quantkit/data/architectures/smollm2-135m.json").read_text())
        cfg.update(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=64)
        tiny.write_text(json.dumps(cfg))
        shapes = {"8b": (f"dummy:{tiny}", 2), "70b": (f"dummy:{tiny}", 1)}
        samples, seq_len = 4, 128
    else:
        layers = dict(x.split(":") for x in a.layers.split(","))
        shapes = {"8b": ("dummy:llama-3.1-8b", int(layers["8b"])), "70b": ("dummy:llama-3.1-70b", int(layers["70b"]))}
        samples, seq_len = 128, 2048
    jobs = [  # priority order: what the issue asks first
        ("8b", "fp8-dynamic"), ("8b", "gptq-w4-g128"), ("8b", "direct-gptq"), ("70b", "gptq-w4-g128"),
        ("8b", "awq-w4-g128"), ("70b", "awq-w4-g128"), ("8b", "int8-w8a8"), ("8b", "fp8-static"),
        ("70b", "fp8-dynamic"), ("8b", "w4a16-rtn"), ("8b", "direct-awq"), ("8b", "trtllm-fp8"),
        ("8b", "trtllm-int4-awq"), ("8b", "gguf-q4km"),
    ]
    if a.jobs:
        jobs = [tuple(j.split(":")) for j in a.jobs.split(",")]
        shapes = {k: v for k, v in shapes.items() if any(k == s for s, _ in jobs)}
    only = {j for _, j in jobs} if a.jobs else None
    recipes = {k: recipe(work / f"scale-{k}.yaml", f"scale-{k}-L{n}", src, n, samples, seq_len, work / f"store-{k}",
                         only) for k, (src, n) in shapes.items()}
    build = [PY, str(ROOT / "scripts/build_peak.py"), "build"]
    results: list[dict] = []
    # the dummy checkpoints first, each in its own process (drawn on the GPU, written once)
    for k, path in recipes.items():
        rec = run([PY, "-c", "import sys; from quantkit.recipe.loader import load_recipe; from quantkit.sources."
                   "resolve import resolve_source; l = load_recipe(sys.argv[1]); s = resolve_source(l.recipe.model, "
                   "l.path.parent); print(s.path, file=sys.stderr); import json; print(json.dumps({'dir': "
                   "str(s.path)}), file=sys.stderr)", str(path)], logs / f"dummy-{k}.log", 300)
        results.append({"shape": k, "job": "materialize dummy", **rec})
    dirs = {r["shape"]: r.get("dir") for r in results}
    calib = None
    for shape, job in jobs:
        left = a.deadline - (time.monotonic() - start)
        if left < 30:
            results.append({"shape": shape, "job": job, "skipped": "deadline"})
            continue
        if job.startswith("gguf"):  # the llama.cpp build may still be compiling beside this lane (gpu_session.sh)
            from quantkit.toolchain.llama_cpp import find_tool

            while time.monotonic() - start < a.deadline - 60:
                try:
                    find_tool("llama-quantize")
                    break
                except Exception:
                    time.sleep(10)
            left = a.deadline - (time.monotonic() - start)
        if job.startswith("direct-"):
            if calib is None:
                calib = calibration_file(samples, seq_len)
            if calib is None or not dirs.get(shape):
                results.append({"shape": shape, "job": job, "skipped": "no calibration cache / model"})
                continue
            # direct-gptq: the same float64 Hessians as quantkit; direct-gptq-f32: stock llm-compressor
            kind, _, variant = job.removeprefix("direct-").partition("-")
            rec = run([PY, str(ROOT / "scripts/direct_oneshot.py"), dirs[shape], str(calib),
                       str(work / f"direct-{shape}-{job}"), kind] + (["--hessians", "float32"] if variant == "f32"
                                                                     else []), logs / f"{shape}-{job}.log", left)
        else:
            rec = run(build + [str(recipes[shape]), "--target", job, "--json"], logs / f"{shape}-{job}.log", left)
            m = manifest_of(work / f"store-{shape}", job)
            if m:
                rec.update(produce_s=m["build"]["produce_s"], devices=m["build"].get("devices"),
                           size_mb=round(m["total_size"] / 1e6, 1), weights=m["source"].get("weights"))
        results.append({"shape": shape, "job": job, **rec})
        (a.out / "results.json").write_text(json.dumps(results, indent=1))
        print(json.dumps(results[-1]), flush=True)
    for shape, path in recipes.items():  # the planner's predictions for the same runs
        p = subprocess.run([PY, "-m", "quantkit.cli", "plan", str(path), "--gpu", "H200", "--host-ram", "128GB",
                            "--json"], capture_output=True, text=True, cwd=ROOT)
        plan = json.loads(p.stdout).get("build") if p.returncode == 0 else p.stderr.strip()[-300:]
        results.append({"shape": shape, "job": "plan", "build": plan})
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    lines = ["| shape | job | exit | process wall s | produce s | peak RSS GB | peak GPU GB | where |", "|---" * 8 + "|"]
    for r in results:
        if r.get("job") == "plan":
            continue
        where = "; ".join(f"{k}: {v}" for k, v in (r.get("devices") or {}).items())
        lines.append(f"| {r['shape']} | {r['job']} | {r.get('exit', r.get('skipped'))} | {r.get('process_wall_s', '')} | "
                     f"{r.get('produce_s', '')} | {r.get('vmhwm', 0) / 1e9:.2f} | "
                     f"{r.get('gpu_peak_allocated', 0) / 1e9:.2f} | {where} |")
    (a.out / "summary.md").write_text("\n".join(lines) + "\n")
    import tarfile

    with tarfile.open(a.out / "logs.tar.gz", "w:gz") as tar:
        tar.add(logs, arcname="logs")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
