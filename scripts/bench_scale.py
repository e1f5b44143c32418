"""CPU memory figures for issue 10 (docs/benchmarks/cpu-scale/): each build in a fresh process, peak RSS from
its own VmHWM (scripts/build_peak.py).

1. `four`: a 4-target build (model-free FP8 and W8A16, GPTQ W4, SmoothQuant+GPTQ W8A8) of a random fp32 model of
   a few GB, against the same build with quantkit at OLD_REF (a deep copy per target) when --old is given;
   the fixed overhead is the same build on a ~0 MB model.
2. `model-free`: FP8-dynamic of a 5.8 GB bf16 model (256 MiB shards) in a cgroup whose memory limit is a third
   of the model's bytes (model-free path, one checkpoint shard at a time).

    python scripts/bench_scale.py --out docs/benchmarks/cpu-scale [--old /path/to/old/checkout] [--only four]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = """\
  - {name: fp8-dynamic, format: fp8, scheme: dynamic}
  - {name: w8a16-rtn, format: int8, scheme: w8a16, algorithm: rtn}
  - {name: gptq-w4, format: gptq, bits: 4, group_size: 128}
  - {name: int8-w8a8, format: int8, scheme: w8a8}"""


def arch(work: Path, name: str, **over) -> Path:
    cfg = json.loads((ROOT / "quantkit/data/architectures/smollm2-135m.json").read_text())
    cfg.update(over)
    p = work / f"{name}.json"
    p.write_text(json.dumps(cfg))
    return p


def materialize(cfg: Path, dtype: str, shard_mb: int | None = None) -> Path:
    from quantkit.recipe.schema import ModelSpec
    from quantkit.sources import dummy

    if shard_mb:
        dummy.SHARD_BYTES = shard_mb * 2**20
    return dummy.resolve_dummy(ModelSpec(source=f"dummy:{cfg}", dtype=dtype)).path


def reshard(src: Path, dst: Path, mb: int) -> Path:
    """The same checkpoint in shards of at most `mb` MiB (one tensor at a time: bounded memory)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    if (dst / "model.safetensors.index.json").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if not f.name.endswith((".safetensors", ".index.json")):
            shutil.copyfile(f, dst / f.name)
    shard, size, n, weight_map = {}, 0, 0, {}

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            save_file(shard, str(dst / f"model-{n:05d}.safetensors"), metadata={"format": "pt"})
            weight_map.update({k: f"model-{n:05d}.safetensors" for k in shard})
            shard, size = {}, 0
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                if size and size + t.nbytes > mb * 2**20:
                    flush()
                shard[k] = t
                size += t.nbytes
    flush()
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def build(work: Path, name: str, model_dir: Path, dtype: str, targets: str, pythonpath: Path) -> dict:
    recipe = work / f"{name}.yaml"
    recipe.write_text(f"name: {name}\nmodel: {{source: {model_dir}, dtype: {dtype}}}\n"
                      "calibration: {num_samples: 16, seq_len: 256}\nbaseline: false\n"
                      f"targets:\n{targets}\neval: {{perplexity: null}}\nstore: {{uri: {work / ('store-' + name)}}}\n")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(ROOT / "scripts/build_peak.py"), "build", str(recipe), "--json",
                        "--report-dir", str(work / f"reports-{name}")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(pythonpath)})
    rec = json.loads(p.stderr.strip().splitlines()[-1])
    if rec["exit"] != 0:
        sys.exit(f"{name} failed:\n{p.stderr[-3000:]}")
    rec["process_wall_s"] = round(time.perf_counter() - t0, 1)
    rec["load_avg_after"] = os.getloadavg()
    out = p.stdout[p.stdout.find("\n{") + 1:] if not p.stdout.startswith("{") else p.stdout
    try:  # each stage's peak RSS and its anon / file-backed split at that moment (quantkit build --json)
        rec["stages"] = [{k: v for k, v in s.items() if k != "cpu_s"} for s in json.loads(out)["stages"]]
    except (ValueError, KeyError):  # an older checkout (--old) without --json stages
        pass
    return rec


def weights_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--old", type=Path, help="a checkout of the code before this change (deep copy per target)")
    ap.add_argument("--only", choices=["four", "model-free"])
    a = ap.parse_args()
    work = Path(os.environ.get("SCALE_WORK", "/tmp/bench-scale"))
    work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    res: dict = {"host": {"machine": platform.machine(), "cpus": os.cpu_count()}, "argv": sys.argv,
                 "commit": commit.strip(), "load_avg_start": os.getloadavg()}
    if a.only in (None, "four"):
        # the overhead model: width 128, so that GPTQ's group of 128 divides it
        tiny = materialize(arch(work, "tiny", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=32, num_hidden_layers=1), "float32")
        big = materialize(arch(work, "big", hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
                               num_key_value_heads=4, head_dim=128, num_hidden_layers=8), "float32")
        calib = 16 * 256 * 8 * 2
        four = {"model_bytes": weights_bytes(big), "calibration_bytes": calib, "targets": TARGETS}
        for label, path in (("new", ROOT), ("old", a.old)):
            if path is None:
                continue
            over = build(work, f"overhead-{label}", tiny, "float32", TARGETS, path)
            run = build(work, f"four-{label}", big, "float32", TARGETS, path)
            four[label] = {"overhead": over, "run": run,
                           "peak_over_overhead_x_model": round((run["vmhwm"] - over["vmhwm"]) / four["model_bytes"], 3),
                           "peak_x_model": round(run["vmhwm"] / four["model_bytes"], 3)}
            print(label, json.dumps(four[label]), flush=True)
        res["four_targets"] = four
    if a.only in (None, "model-free"):
        cfg = arch(work, "wide", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=128, num_hidden_layers=12, vocab_size=32000,
                   tie_word_embeddings=False)
        model = reshard(materialize(cfg, "bfloat16", shard_mb=512), work / "wide-256mb", 256)
        mb = weights_bytes(model)
        limit = mb // 3  # the process gets a third of the model's bytes (cgroup v1 memory limit, page cache included)
        cg = Path("/sys/fs/cgroup/memory/quantkit-bench-scale")
        cg.mkdir(exist_ok=True)
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        (cg / "cgroup.procs").write_text(str(os.getpid()))  # children inherit it
        try:
            run = build(work, "model-free", model, "bfloat16", "  - {name: fp8-dynamic, format: fp8, scheme: dynamic}",
                        ROOT)
        finally:
            Path("/sys/fs/cgroup/memory/cgroup.procs").write_text(str(os.getpid()))
            failcnt = int((cg / "memory.failcnt").read_text())
            max_usage = int((cg / "memory.max_usage_in_bytes").read_text())
            cg.rmdir()
        res["model_free"] = {"model_bytes": mb, "shards": len(list(model.glob("*.safetensors"))), "run": run,
                             "cgroup_memory_limit": limit, "cgroup_max_usage": max_usage,
                             "cgroup_failcnt": failcnt, "peak_x_model": round(run["vmhwm"] / mb, 3)}
        print(json.dumps(res["model_free"]), flush=True)
    (a.out / "results.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
