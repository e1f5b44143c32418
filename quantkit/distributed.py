"""Calibration spread over several GPUs: llm-compressor's distributed oneshot, one process per GPU, started by
quantkit itself (the user runs the same `quantkit build`; `model.gpus: N|auto`).

The parent writes the job (recipe path, modifiers, output dir) to a file and starts N ranks of
`python -m quantkit.distributed JOB` with the torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*).
Each rank loads the model through compressed-tensors' `load_offloaded_model` (rank 0 reads the weights, the
others share them), takes the build's cached calibration set (llm-compressor partitions identical datasets
across ranks by itself), and calls `oneshot`; `save_pretrained` writes from rank 0 only. NCCL on GPUs; gloo on
a CPU host, where the same launcher is tested.
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

# what the workplace requires of every NCCL program (and harmless elsewhere): no NVLink multicast
NCCL_SAFE = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(job: dict, world: int, workdir: Path, timeout: float | None = None) -> list[dict]:
    """Start `world` ranks on `job`; -> each rank's result record. A failing rank fails the whole run."""
    workdir.mkdir(parents=True, exist_ok=True)
    job_file = workdir / "job.pkl"
    job_file.write_bytes(pickle.dumps(job))
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, **NCCL_SAFE, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "TORCHELASTIC_RUN_ID": f"quantkit-{os.getpid()}"}
        log = open(workdir / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "quantkit.distributed", str(job_file)], env=env,
                                       stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + timeout if timeout else None
    try:
        while any(p.poll() is None for p, _ in procs):
            if any(p.returncode not in (None, 0) for p, _ in procs):
                break  # one rank died: the others would wait forever in a collective
            if deadline and time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    bad = [(r, p.returncode) for r, (p, _) in enumerate(procs) if p.returncode != 0]
    if bad:
        rank, code = bad[0]
        tail = (workdir / f"rank{rank}.log").read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise UserError(f"distributed calibration: rank {rank} of {world} exited {code}: {tail[0][:300]}",
                        fix=f"see {workdir}/rank{rank}.log; or set model.gpus: 1")
    return [pickle.loads((workdir / f"rank{r}.result").read_bytes()) for r in range(world)]


def run_distributed(ctx, modifiers: list, out_dir: Path) -> None:
    """The calibrated oneshot of one target over `ctx.placement.gpus` processes, saved to out_dir."""
    world = ctx.placement.gpus
    job = {"recipe": str(ctx.loaded.path), "modifiers": modifiers, "out_dir": str(out_dir),
           "workdir": str(ctx.workdir)}
    t0 = time.perf_counter()
    results = launch(job, world, ctx.workdir / f"dist-{out_dir.name}")
    ctx.devices["calibration"] = (f"{world} processes (torch.distributed, {results[0]['backend']}): "
                                  + ", ".join(r["device"] for r in results) + "; weights offloaded, one layer "
                                  f"at a time per GPU; {time.perf_counter() - t0:.1f} s")


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
    import torch
    import torch.distributed as dist
    from compressed_tensors.offload import load_offloaded_model
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    from quantkit.context import BuildContext
    from quantkit.recipe.loader import load_recipe
    from quantkit.sources.resolve import resolve_source
    from quantkit.util import quiet_llmcompressor

    job = pickle.loads(Path(job_file).read_bytes())
    rank = int(os.environ["RANK"])
    backend = _init_process_group()
    quiet_llmcompressor()
    loaded = load_recipe(Path(job["recipe"]))
    ctx = BuildContext(loaded, resolve_source(loaded.recipe.model, base_dir=loaded.path.parent), Path(job["workdir"]))
    kw = dict(dtype=ctx.torch_dtype, trust_remote_code=ctx.recipe.model.trust_remote_code)
    if ctx.recipe.model.offload == "disk":
        kw.update(offload_folder=ctx.recipe.model.offload_dir)
    with load_offloaded_model():
        model = AutoModelForCausalLM.from_pretrained(ctx.source.path, device_map="auto_offload", **kw)
    oneshot(model=model, recipe=job["modifiers"], tokenizer=ctx.tokenizer, **ctx.oneshot_calibration_kwargs())
    out_dir = Path(job["out_dir"])
    model.save_pretrained(out_dir, save_compressed=True)  # rank 0 writes; the others take part
    if rank == 0:
        ctx.tokenizer.save_pretrained(out_dir)
    device = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else f"cpu rank {rank}"
    (Path(job_file).parent / f"rank{rank}.result").write_bytes(pickle.dumps({"device": device, "backend": backend}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    rank_main(sys.argv[1])
