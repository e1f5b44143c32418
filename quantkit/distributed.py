"""Calibration spread over several GPUs: llm-compressor's distributed oneshot, one process per GPU, started by
quantkit itself (the user runs the same `quantkit build`; `model.gpus: N|auto`).

The parent writes the job (recipe path, modifiers, output dir) to a file and starts N ranks of
`python -m quantkit.distributed JOB` with the torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*).
Each rank loads the model through compressed-tensors' `load_offloaded_model` (rank 0 reads the weights, the
others share them through /dev/shm), takes the build's cached calibration set (llm-compressor partitions
identical datasets across ranks by itself), and calls `oneshot`; `save_pretrained` writes from rank 0 only. NCCL
on GPUs; gloo on a CPU host, where the same launcher is tested (`QUANTKIT_CPU_RANKS`, quantkit/placement.py).
"""
from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

from quantkit.errors import UserError

# modifiers that rewrite weights from their current values on every rank (identical scales from all-reduced
# statistics): right on GPUs, where each rank holds its own onloaded copy, wrong on CPU ranks, which share one
IN_PLACE_RESCALING = ("SmoothQuantModifier", "AWQModifier")
SHM_RESERVE = 5e9  # load_offloaded_model's extra_cpu_mem: shared memory it leaves for everything else
# what the workplace requires of every NCCL program (and harmless elsewhere): no NVLink multicast
NCCL_SAFE = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """`world` rank processes, started before their job is known: each imports torch, transformers and
    llm-compressor and joins the process group while the parent does other work (the baseline, the calibration
    set), then waits for the job file. Those seconds are most of a rank's start-up (H200: ~25 s per rank beside a
    36 s calibration at 8 layers; this CPU: 5.6 of 6.6 s are imports). One job per set of ranks."""

    def __init__(self, world: int, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self.world, self.dir, self.used = world, workdir, False
        self.job_file = workdir / "job.pkl"
        port = _free_port()
        self.procs = []
        for rank in range(world):
            env = {**os.environ, **NCCL_SAFE, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                   "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "TORCHELASTIC_RUN_ID": f"quantkit-{os.getpid()}"}
            log = open(workdir / f"rank{rank}.log", "w")
            self.procs.append((subprocess.Popen([sys.executable, "-m", "quantkit.distributed", str(self.job_file)],
                                                env=env, stdout=log, stderr=subprocess.STDOUT), log))

    def run(self, job: dict, timeout: float | None = None) -> list[dict]:
        """Hand the ranks their job; -> each rank's result record. A failing rank fails the whole run."""
        self.used = True
        tmp = self.job_file.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(job))
        tmp.replace(self.job_file)  # whole or absent: a waiting rank never reads half a job
        deadline = time.monotonic() + timeout if timeout else None
        try:
            while any(p.poll() is None for p, _ in self.procs):
                if any(p.returncode not in (None, 0) for p, _ in self.procs):
                    break  # one rank died: the others would wait forever in a collective
                if deadline and time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        finally:
            self.close()
        bad = [(r, p.returncode) for r, (p, _) in enumerate(self.procs) if p.returncode != 0]
        if bad:
            import shutil

            from quantkit.util import cache_dir

            rank, code = bad[0]
            tail = (self.dir / f"rank{rank}.log").read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
            kept = cache_dir("logs") / f"distributed-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
            shutil.copytree(self.dir, kept, ignore=shutil.ignore_patterns("*.pkl", "*.result"))  # the build's
            # work folder goes when the build fails: the ranks' logs are kept
            raise UserError(f"distributed calibration: rank {rank} of {self.world} exited {code}: {tail[0][:300]}",
                            fix=f"see {kept}/rank{rank}.log; or set model.gpus: 1")
        return [pickle.loads((self.dir / f"rank{r}.result").read_bytes()) for r in range(self.world)]

    def close(self) -> None:
        """Stop ranks still running or still waiting for a job (a build that ended without one)."""
        for p, log in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()


def launch(job: dict, world: int, workdir: Path, timeout: float | None = None) -> list[dict]:
    """Start `world` ranks on `job`; -> each rank's result record. A failing rank fails the whole run."""
    return Ranks(world, workdir).run(job, timeout)


def check_shared_memory(model_bytes: float, offload: str, shm: str = "/dev/shm") -> None:
    """Ranks share the host copy of the weights through /dev/shm (compressed-tensors' distributed CPU
    offload); a smaller /dev/shm (a container's 64 MB default) would fail deep inside the load."""
    import shutil

    if offload == "disk":
        return
    try:
        have = shutil.disk_usage(shm).total
    except OSError:
        return  # no /dev/shm: compressed-tensors warns and falls back to host RAM
    if have - SHM_RESERVE < model_bytes:  # compressed-tensors keeps SHM_RESERVE of it free
        raise UserError(f"model.gpus: the ranks share {model_bytes / 1e9:.1f} GB of weights through {shm}, which "
                        f"holds {have / 1e9:.1f} GB ({SHM_RESERVE / 1e9:.0f} GB of it kept free)",
                        fix=f"enlarge {shm} (mount -o remount,size=...), set model.offload: disk with an "
                            "offload_dir, or model.gpus: 1")


def run_distributed(ctx, modifiers: list, out_dir: Path) -> None:
    """The calibrated oneshot of one target over `ctx.placement.gpus` processes, saved to out_dir."""
    world = ctx.placement.gpus
    check_shared_memory(ctx.weight_bytes, ctx.placement.weights)
    in_place = [type(m).__name__ for m in modifiers if type(m).__name__ in IN_PLACE_RESCALING]
    if in_place and not ctx.placement.on_gpu:
        raise UserError(f"{in_place[0]} over CPU ranks: every rank would rescale the weights all ranks share "
                        "(on GPUs each rank rescales its own copy)", fix="use model.gpus: 1 on a CPU host")
    job = {"recipe": str(ctx.loaded.path), "modifiers": modifiers, "out_dir": str(out_dir),
           "workdir": str(ctx.workdir)}
    t0 = time.perf_counter()
    ready = getattr(ctx, "ranks", None)  # started with the build (quantkit/build.py), for the first such target
    early = ready is not None and ready.world == world and not ready.used
    results = ready.run(job) if early else launch(job, world, ctx.workdir / f"dist-{out_dir.name}")
    ctx.devices["calibration"] = (f"{world} processes (torch.distributed, {results[0]['backend']}"
                                  f"{', started with the build' if early else ''}): "
                                  + ", ".join(r["device"] for r in results) + "; weights offloaded, one layer "
                                  f"at a time per GPU; {time.perf_counter() - t0:.1f} s")
    ctx.devices["ranks"] = "; ".join(describe_rank(r) for r in results)


def describe_rank(r: dict) -> str:
    """One rank's record as the build log and manifest show it (scripts/bench_distributed.py reads it back)."""
    gpu = f", GPU peak {r['gpu_peak_allocated'] / 1e9:.2f} GB allocated" if r.get("gpu_peak_allocated") else ""
    up = dict(r.get("startup_s") or {})
    waited = up.pop("waiting for the job", None)
    start = (f"start-up {sum(up.values()):.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in up.items())}), "
             if up else "") + (f"then {waited:.1f} s ready before its job, " if waited else "")
    return (f"rank {r['rank']} {r['device']}: {start}calibration samples {r['samples']}, load {r['load_s']:.1f} s, "
            f"oneshot {r['oneshot_s']:.1f} s, "
            f"save {r['save_s']:.1f} s{gpu}, host peak {r['vmhwm'] / 1e9:.2f} GB")


def sync_after_qparam_exchange() -> None:
    """After each layer's quantization, llm-compressor (0.14) broadcasts the new weights from the rank that
    computed them, but skips modules that execute on the CPU: their weights live in the CPU offload that all
    ranks share, written in place. Nothing then orders those writes before the other ranks' next reads (the
    propagation pass through the same layer, the next layer's weight observers), so on a CPU host a rank reads
    another rank's layer half-written and the 2-rank result drifts from the 1-rank one (measured: up to 2.3 x
    a layer's norm). One barrier after every exchange restores the order; where the exchange is a broadcast
    (GPUs) it is synchronized already and the barrier costs one round trip per layer."""
    import importlib

    import torch.distributed as dist

    gptq_base = importlib.import_module("llmcompressor.modifiers.gptq.base")
    quant_base = importlib.import_module("llmcompressor.modifiers.quantization.quantization.base")
    exchange = importlib.import_module("llmcompressor.utils.dist").broadcast_qparams_and_cleanup

    def exchange_then_barrier(*args, **kwargs):
        exchange(*args, **kwargs)
        dist.barrier()

    for module in (gptq_base, quant_base):  # where the name was imported
        module.broadcast_qparams_and_cleanup = exchange_then_barrier


def gptq_hessians_in_float64() -> None:
    """GPTQ's Hessians accumulate in float64; the solve still runs in llm-compressor's float32.

    Why: llm-compressor (0.14) sums each module's input products `2 x x^T` into a float32 Hessian, so the result
    depends on the order of the additions: one process adds samples 0..N-1 in turn, N ranks each add their share
    and `dist.reduce` adds the shares. The two differ in the last bits; where a weight sits near a rounding tie
    its integer code flips, GPTQ's error feedback and the next layers' inputs carry it on (measured on the demo
    model: 16% of the codes, perplexity 1.45% apart). Summed in float64, the per-sample float32 products add
    exactly, or with an error 2^29 times below float32's, in any order: one process and N ranks hand the same
    float32 Hessian to the solve (measured on CPU ranks: the tiny test's and the demo model's codes all equal,
    docs/benchmarks/cpu-scale). No option exists for it (`make_empty_hessian` allocates `GPTQ_PRECISION`, which
    is also the solve's precision), hence the override of the name GPTQModifier calls. Cost: the Hessians take twice the
    memory while calibrating (a 28672-column down_proj: 6.6 GB instead of 3.3 GB)."""
    import importlib

    import torch

    gptq_base = importlib.import_module("llmcompressor.modifiers.gptq.base")
    if getattr(gptq_base.make_empty_hessian, "quantkit_float64", False):
        return
    allocate = gptq_base.make_empty_hessian

    def make_empty_hessian_float64(module, device=None):
        return allocate(module, device=device).to(torch.float64)

    make_empty_hessian_float64.quantkit_float64 = True
    gptq_base.make_empty_hessian = make_empty_hessian_float64


def rank_rows(samples: int, rank: int, world: int) -> range:
    """This rank's calibration samples: a contiguous share, the sizes differing by one at most.

    Each rank is handed its own share, as llm-compressor's own examples load a partition per rank: given the
    same dataset on every rank, llm-compressor 0.14 splits it itself but builds the DataLoader over the whole
    set with a sampler over the share's positions, so every rank calibrates on the first 1/world of the set
    (measured: both ranks' layer-0 Hessians were samples 0-3 of 8; the 2-rank GPTQ came out 18-24% of a
    layer's norm away from the 1-process one)."""
    if samples < world:
        raise UserError(f"calibration.num_samples: {samples} samples cannot be shared by {world} ranks",
                        fix=f"use at least {world} samples, or fewer GPUs")
    return range(samples * rank // world, samples * (rank + 1) // world)


def _init_process_group() -> str:
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        from compressed_tensors.offload import init_dist

        init_dist()  # NCCL, one GPU per LOCAL_RANK
        return "nccl"
    dist.init_process_group(backend="gloo", init_method="env://", rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))
    return "gloo"


def rank_main(job_file: str) -> None:
    import psutil

    marks = [("born", psutil.Process().create_time())]  # where a rank's start-up goes (the H200's 8-layer pair:
    import torch  # ~25 s of each rank outside load + oneshot + save)
    import torch.distributed as dist
    from compressed_tensors.offload import load_offloaded_model
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    from quantkit.context import BuildContext
    from quantkit.recipe.loader import load_recipe
    from quantkit.sources.resolve import resolve_source
    from quantkit.util import quiet_llmcompressor

    marks.append(("imports", time.time()))
    rank = int(os.environ["RANK"])
    backend = _init_process_group()
    marks.append(("process group", time.time()))
    job_path, parent = Path(job_file), os.getppid()
    while not job_path.exists():  # started ahead of the job (Ranks): wait; leave if the build ended without one
        if os.getppid() != parent or not job_path.parent.exists():
            return
        time.sleep(0.1)
    marks.append(("waiting for the job", time.time()))
    job = pickle.loads(job_path.read_bytes())
    quiet_llmcompressor()
    sync_after_qparam_exchange()
    gptq_hessians_in_float64()
    loaded = load_recipe(Path(job["recipe"]))
    ctx = BuildContext(loaded, resolve_source(loaded.recipe.model, base_dir=loaded.path.parent), Path(job["workdir"]))
    kw = dict(dtype=ctx.torch_dtype, trust_remote_code=ctx.recipe.model.trust_remote_code)
    if ctx.recipe.model.offload == "disk":
        kw.update(offload_folder=ctx.recipe.model.offload_dir)
    rows = rank_rows(len(ctx.calibration.input_ids), rank, int(os.environ["WORLD_SIZE"]))
    calib = ctx.oneshot_calibration_kwargs(rows)
    share = f"{len(rows)} of {len(ctx.calibration.input_ids)} (rows {rows.start}-{rows.stop - 1})"
    marks.append(("source + calibration set", time.time()))
    t0 = time.perf_counter()
    with load_offloaded_model():
        model = AutoModelForCausalLM.from_pretrained(ctx.source.path, device_map="auto_offload", **kw)
    t1 = time.perf_counter()
    oneshot(model=model, recipe=job["modifiers"], tokenizer=ctx.tokenizer, **calib)
    t2 = time.perf_counter()
    out_dir = Path(job["out_dir"])
    model.save_pretrained(out_dir, save_compressed=True)  # rank 0 writes; the others take part
    if rank == 0:
        ctx.tokenizer.save_pretrained(out_dir)
    t3 = time.perf_counter()
    device = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else f"cpu rank {rank}"
    hwm = next((int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:")), 0)
    record = {"rank": rank, "device": device, "backend": backend, "samples": share, "load_s": t1 - t0,
              "oneshot_s": t2 - t1,
              "save_s": t3 - t2, "vmhwm": hwm,
              "startup_s": {b[0]: round(b[1] - a[1], 2) for a, b in zip(marks, marks[1:])},
              "gpu_peak_allocated": torch.cuda.max_memory_allocated() if backend == "nccl" else None}
    (Path(job_file).parent / f"rank{rank}.result").write_bytes(pickle.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    rank_main(sys.argv[1])
