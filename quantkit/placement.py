"""Where a target's weights live and where its work runs, decided once per build from the recipe and the host.

- Calibrated llm-compressor targets ("layerwise"): weights stay in host RAM (`cpu`) or on disk (`disk`);
  llm-compressor's sequential pipeline onloads one decoder layer at a time to the GPU (or computes on the CPU
  where there is none). A model bigger than host RAM goes to disk under `offload: auto`.
- Forward passes quantkit or ModelOpt drive ("whole": ModelOpt calibration, the GGUF importance matrix): the
  whole model on the GPU when it fits there, else spread over GPU(s) and host RAM by accelerate's device map,
  else the CPU.
- Data-free schemes never build the model (llm-compressor's model-free path, shard by shard).

The decision is pure (numbers in, a Placement out) so its rules are tested on any host; `probe()` reads them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.errors import UserError

HEADROOM = 1.15  # weights x this must fit where they are put: activations, scales, allocator slack
HOST_RESERVE = 4e9  # host bytes kept for the interpreter, libraries and the calibration set


@dataclass(frozen=True)
class Host:
    cuda_devices: int
    gpu_name: str | None
    gpu_bytes: float  # per device
    host_available: float
    # CPU processes (gloo) that may stand in for GPUs on a host without CUDA: the distributed launcher's tests
    # and dry runs (`QUANTKIT_CPU_RANKS=N`); 0 everywhere else
    cpu_ranks: int = 0

    @property
    def compute(self) -> str:
        return f"cuda:0 ({self.gpu_name})" if self.cuda_devices else "cpu"


@dataclass(frozen=True)
class Placement:
    weights: str  # "cpu" | "disk" | "gpu" (where the model's weights live while a target is made)
    compute: str  # "cpu" | "cuda:0 (NAME)"
    gpus: int  # processes (one per GPU) that calibrate together; 1 = no torch.distributed
    offload_dir: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def on_gpu(self) -> bool:
        return self.compute != "cpu"

    def describe(self) -> str:
        where = {"cpu": "weights in host RAM", "disk": f"weights offloaded to disk ({self.offload_dir})",
                 "gpu": "weights on the GPU"}[self.weights]
        how = "one decoder layer at a time on " + self.compute if self.weights != "gpu" else self.compute
        if self.compute == "cpu":
            how = "computed on the CPU (no CUDA device)"
        procs = f"{self.gpus} GPUs" if self.on_gpu else f"{self.gpus} CPU processes (gloo)"
        return f"{where}; {how}" + (f"; {procs} (torch.distributed)" if self.gpus > 1 else "")


def probe() -> Host:
    import psutil
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    name, mem = None, 0.0
    if n:
        props = torch.cuda.get_device_properties(0)
        name, mem = props.name, float(props.total_memory)
    cpu_ranks = int(os.environ.get("QUANTKIT_CPU_RANKS") or 0) if not n else 0
    return Host(n, name, mem, float(psutil.virtual_memory().available), cpu_ranks)


def _writable(d: str) -> bool:
    p = Path(d)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(p, os.W_OK | os.X_OK)


def decide(spec, model_bytes: float, host: Host, where: str = "model") -> Placement:
    """spec: the recipe's ModelSpec (offload, offload_dir, gpus). Bad combinations are one-line UserErrors."""
    gpus = spec.gpus
    if gpus == "auto":
        gpus = max(1, host.cuda_devices)
    if gpus > 1 and gpus > max(host.cuda_devices, host.cpu_ranks):
        raise UserError(f"{where}.gpus: {gpus} GPUs asked for, {host.cuda_devices} present on this host",
                        fix=f"set gpus: {max(1, host.cuda_devices)} or auto")
    notes = []
    offload = spec.offload
    if offload == "disk" and not spec.offload_dir:
        raise UserError(f"{where}.offload: disk needs a writable offload_dir", fix=f"add {where}.offload_dir: PATH")
    if spec.offload_dir and offload in ("disk", "auto") and not _writable(spec.offload_dir):
        raise UserError(f"{where}.offload_dir: {spec.offload_dir} is not a writable directory",
                        fix="give a directory this user can create and write")
    fits_host = model_bytes * HEADROOM + HOST_RESERVE <= host.host_available
    if offload == "auto":
        if fits_host:
            offload = "cpu"
        else:
            offload = "disk"
            notes.append(f"{model_bytes / 1e9:.1f} GB of weights > {host.host_available / 1e9:.1f} GB free host "
                         "RAM: offloaded to disk")
    elif offload == "cpu" and not fits_host:
        notes.append(f"offload: cpu, but {model_bytes / 1e9:.1f} GB of weights may not fit "
                     f"{host.host_available / 1e9:.1f} GB of free host RAM")
    weights = {"none": "gpu" if host.cuda_devices else "cpu"}.get(offload, offload)
    if weights == "gpu" and model_bytes * HEADROOM > host.gpu_bytes:
        raise UserError(f"{where}.offload: none puts {model_bytes / 1e9:.1f} GB of weights on one "
                        f"{host.gpu_bytes / 1e9:.0f} GB GPU", fix="use offload: auto (one layer at a time)")
    offload_dir = None
    if weights == "disk":
        offload_dir = spec.offload_dir or str(default_offload_dir())
    return Placement(weights, host.compute, gpus, offload_dir, notes)


def default_offload_dir() -> Path:
    """`offload: auto` without an offload_dir spills here (the cache's disk, not /tmp, which may be RAM)."""
    from quantkit.util import cache_dir

    return cache_dir("offload")


def whole_model_device_map(model_bytes: float, host: Host) -> tuple[object, str]:
    """For forward passes over the whole model (ModelOpt, imatrix, baseline perplexity): -> (device_map, where)."""
    if not host.cuda_devices:
        return None, "cpu"
    if model_bytes * HEADROOM <= host.gpu_bytes:
        return {"": 0}, f"cuda:0 ({host.gpu_name})"
    return "auto", (f"{host.cuda_devices} x {host.gpu_name} + host RAM (accelerate device_map=auto: layers that "
                    "do not fit the GPUs run from host RAM)")
