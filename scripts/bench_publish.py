"""What publishing a build's artifact into a local store costs: copied (every blob written again) against
hard-linked (`Store.publish(..., link=True)`, what `quantkit build` does with its staging directory when the
store is on the same filesystem), and how much of either is the sha256 of the files.

    python scripts/bench_publish.py [--size-mb 1024] [--files 2] [--repeats 3] [--dir /tmp]

The artifact is random bytes in --files safetensors-named files plus a config, written once under --dir (so on
its filesystem, as a build's staging under TMPDIR); each publish goes into a fresh store beside it and the modes
alternate, all from a warm page cache (the store path, not the disk). Prints one JSON line per publish and a
summary line with the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantkit.store.store import Store  # noqa: E402
from quantkit.util import sha256_file  # noqa: E402


def artifact(dest: Path, size_mb: int, files: int) -> Path:
    dest.mkdir()
    for i in range(files):
        with open(dest / f"model-{i + 1:05d}-of-{files:05d}.safetensors", "wb") as f:
            for _ in range(size_mb // files):
                f.write(os.urandom(1 << 20))
    (dest / "config.json").write_text('{"model_type": "random"}\n')
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--files", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where staging and stores go (default: TMPDIR)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="quantkit-bench-publish-", dir=a.dir))
    try:
        staging = artifact(work / "staging", a.size_mb, a.files)
        paths = sorted(p for p in staging.rglob("*") if p.is_file())
        size = sum(p.stat().st_size for p in paths)
        times: dict[str, list[float]] = {"hash only": [], "copy": [], "link": []}
        for r in range(a.repeats):
            t0 = time.perf_counter()
            for p in paths:
                sha256_file(p)
            times["hash only"].append(time.perf_counter() - t0)
            for mode in ("copy", "link") if r % 2 == 0 else ("link", "copy"):
                st = Store(str(work / f"store-{mode}-{r}"))
                manifest = {"id": f"bench.{mode}.{r}", "recipe": {"name": "bench"},
                            "target": {"name": mode, "format": "x"}, "source": {"uri": "bench", "fingerprint": "b"},
                            "engine": "transformers", "entry": ".", "info": {},
                            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                t0 = time.perf_counter()
                m = st.publish(staging, manifest, link=mode == "link")
                dt = time.perf_counter() - t0
                times[mode].append(dt)
                linked = sum(os.stat(st.blob_path(f["sha256"])).st_ino == os.stat(staging / f["path"]).st_ino
                             for f in m["files"])
                print(json.dumps({"mode": mode, "repeat": r, "publish_s": round(dt, 3), "bytes": m["total_size"],
                                  "files": len(m["files"]), "blobs_linked": linked,
                                  "load_avg": os.getloadavg()[0]}), flush=True)
                assert st.verify() == []
                shutil.rmtree(work / f"store-{mode}-{r}")  # the staging files are single-named again
        med = {k: round(statistics.median(v), 3) for k, v in times.items()}
        print(json.dumps({"summary": True, "bytes": size, "files": len(paths), "median_s": med,
                          "copy_over_link": round(med["copy"] / med["link"], 2), "repeats": a.repeats}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
