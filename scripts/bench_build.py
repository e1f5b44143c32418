"""Wall time and peak RSS per stage of a build (default: the demo recipe) into a fresh store, then the
re-run (a cache hit) as a user runs it: a new `quantkit build` process.

    .venv/bin/python scripts/bench_build.py [RECIPE] [--store DIR]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("QUANTKIT_DATA", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RERUN = """
import runpy, sys
sys.argv = ["quantkit", *sys.argv[1:]]
try:
    runpy.run_module("quantkit.cli", run_name="__main__")
finally:
    hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    print(f"QUANTKIT_PEAK_RSS_MB={hwm / 1024:.0f}", file=sys.stderr)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe", nargs="?", default=str(ROOT / "recipes" / "smollm2-135m-demo.yaml"))
    ap.add_argument("--store", default=None, help="store dir (default: a fresh temporary one)")
    args = ap.parse_args()
    store = args.store or tempfile.mkdtemp(prefix="quantkit-bench-store-")

    from quantkit.build import run_build
    from quantkit.recipe.loader import load_recipe
    from quantkit.util import host_info, library_versions

    err = Console(stderr=True)
    result = run_build(load_recipe(args.recipe), store=store, console=err)
    t = Table(title=f"bench_build: {Path(args.recipe).name}, fresh store {store}")
    for c in ("stage", "wall s", "peak RSS MB"):
        t.add_column(c, justify="left" if c == "stage" else "right")
    for s in result.stages:
        t.add_row(s["stage"], f"{s['wall_s']:.1f}", f"{s['peak_rss_mb']:.0f}")

    t0 = time.perf_counter()
    # the child reports its own VmHWM: ru_maxrss (RUSAGE_CHILDREN, or the child's own) keeps the high-water
    # mark this big process had when it forked, across exec
    r = subprocess.run([sys.executable, "-c", RERUN, "build", args.recipe, "--store", store, "--json",
                        "--report-dir", tempfile.mkdtemp()], capture_output=True, text=True)
    rerun_s = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"re-run failed: {r.stderr[-2000:]}")
    child_peak = float(r.stderr.rsplit("QUANTKIT_PEAK_RSS_MB=", 1)[1].split()[0])
    t.add_row("re-run (new process, all cached)", f"{rerun_s:.1f}", f"{child_peak:.0f}")
    out = Console()
    out.print(t)
    h = host_info()
    v = library_versions()
    out.print(f"host: {h['platform']}, {h['cpus']} cpus; torch {v.get('torch')}, transformers "
              f"{v.get('transformers')}, llmcompressor {v.get('llmcompressor')}")


if __name__ == "__main__":
    main()
