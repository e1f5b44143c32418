"""Run `quantkit ARGS...` in this process and print its peak RSS (VmHWM) and, where CUDA was used, its peak
GPU memory, last, as one JSON line on stderr.

Used by tests/test_scale.py and scripts/bench_scale.py: the build runs in a fresh interpreter so its peak is
its own (VmHWM is per process; RUSAGE_CHILDREN would mix in every earlier child).
    python scripts/build_peak.py build RECIPE --store DIR ...
"""
from __future__ import annotations

import json
import sys
import time


def vm(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    from quantkit.cli import main as cli_main

    t0 = time.perf_counter()
    code = 0
    try:
        sys.argv = ["quantkit", *sys.argv[1:]]
        cli_main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    rec = {"exit": code, "wall_s": round(time.perf_counter() - t0, 2), "vmhwm": vm("VmHWM"), "vmrss": vm("VmRSS")}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        rec.update(gpu=torch.cuda.get_device_name(0), gpu_peak_allocated=torch.cuda.max_memory_allocated(),
                   gpu_peak_reserved=torch.cuda.max_memory_reserved())
    print(json.dumps(rec), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
