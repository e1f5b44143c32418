"""Run `quantkit ARGS...` in this process and print its peak RSS (VmHWM) and, where CUDA was used, its peak
GPU memory, last, as one JSON line on stderr.

Used by tests/test_scale.py and scripts/bench_scale.py: the build runs in a fresh interpreter so its peak is
its own (VmHWM is per process; RUSAGE_CHILDREN would mix in every earlier child).
    python scripts/build_peak.py build RECIPE --store DIR ...
"""
from __future__ import annotations

import json
import sys
import threading
import time


def vm(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class RssSampler(threading.Thread):
    """Peaks of the resident set's parts every 20 ms: anonymous (the process's own memory: tensors, heap),
    file-backed (pages of memory-mapped files, e.g. safetensors, which the kernel may drop), shared memory.
    VmHWM is their sum's peak; the parts say which kind of memory made it."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0, "RssFile": 0, "RssShmem": 0}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            with open("/proc/self/status") as f:
                for line in f:
                    k = line.split(":", 1)[0]
                    if k in self.peak:
                        self.peak[k] = max(self.peak[k], int(line.split()[1]) * 1024)
            self.stop.wait(0.02)


def main() -> int:
    from quantkit.cli import main as cli_main

    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    code = 0
    try:
        sys.argv = ["quantkit", *sys.argv[1:]]
        cli_main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sampler.stop.set()
    rec = {"exit": code, "wall_s": round(time.perf_counter() - t0, 2), "vmhwm": vm("VmHWM"), "vmrss": vm("VmRSS"),
           **{f"peak_{k.lower()}": v for k, v in sampler.peak.items()}}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        rec.update(gpu=torch.cuda.get_device_name(0), gpu_peak_allocated=torch.cuda.max_memory_allocated(),
                   gpu_peak_reserved=torch.cuda.max_memory_reserved())
    print(json.dumps(rec), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
