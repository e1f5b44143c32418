"""Store throughput: publish and pull MB/s on a local directory and on a loopback S3 server (moto, started here),
and what content addressing saves when a second artifact shares most files with the first.

    .venv/bin/python scripts/bench_store.py [--artifact DIR] [--size-mb 500]

The artifact is models/smollm2-135m-instruct when present (about 540 MB), else random files of --size-mb.
Publish = hash + upload (blobs, then manifest); pull = download + re-hash every file. Both run from a warm
page cache on this machine, so they measure the store path, not the disk. The dedup row publishes the same
files again under a new id with one file changed (config.json), as a rebuild with another setting would.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from loopback_s3 import moto_server  # noqa: E402
from quantkit.store.store import Store  # noqa: E402


def artifact(arg: str | None, size_mb: int, tmp: Path) -> tuple[Path, str]:
    src = Path(arg) if arg else ROOT / "models" / "smollm2-135m-instruct"
    if src.is_dir() and any(src.iterdir()):
        out = tmp / "artifact"
        shutil.copytree(src, out)  # a private copy: the dedup step edits a file
        return out, str(src.relative_to(ROOT) if src.is_relative_to(ROOT) else src)
    out = tmp / "artifact"
    out.mkdir()
    per = size_mb * (1 << 20) // 4
    for i in range(4):
        with open(out / f"model-{i:05d}.safetensors", "wb") as f:
            for _ in range(per // (1 << 20)):
                f.write(os.urandom(1 << 20))
    (out / "config.json").write_text('{"model_type": "random"}\n')
    return out, "random bytes"


def blob_bytes(st: Store) -> int:
    try:
        return sum(i["size"] for i in st.fs.find(st._p("blobs"), detail=True).values())
    except FileNotFoundError:
        return 0


def bench(name: str, uri: str, art: Path, tmp: Path) -> dict:
    st = Store(uri)
    manifest = {"id": "bench.first.1", "recipe": {"name": "bench"}, "target": {"name": "first", "format": "x"},
                "source": {"uri": "bench", "fingerprint": "bench"}, "engine": "transformers", "entry": ".",
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "info": {}}
    t0 = time.perf_counter()
    m = st.publish(art, manifest)
    publish_s = time.perf_counter() - t0
    size = m["total_size"]
    t0 = time.perf_counter()
    st.materialize(m["id"], tmp / f"pulled-{name}")
    pull_s = time.perf_counter() - t0
    shutil.rmtree(tmp / f"pulled-{name}")
    before = blob_bytes(st)
    cfg = art / "config.json"
    original = cfg.read_bytes()
    cfg.write_bytes(original.replace(b"{", b'{"bench_variant": 2, ', 1))
    t0 = time.perf_counter()
    m2 = st.publish(art, {**manifest, "id": "bench.second.2", "target": {"name": "second", "format": "x"}})
    second_s = time.perf_counter() - t0
    cfg.write_bytes(original)
    added = blob_bytes(st) - before
    assert st.verify() == []
    return {"store": name, "MB": size / 1e6, "publish_s": publish_s, "publish": size / 1e6 / publish_s,
            "pull_s": pull_s, "pull": size / 1e6 / pull_s, "second_s": second_s, "added": added,
            "saved": 1 - added / m2["total_size"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", help="a directory to publish (default: models/smollm2-135m-instruct)")
    ap.add_argument("--size-mb", type=int, default=500, help="random artifact size when no directory is there")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="quantkit-bench-store-"))
    try:
        art, label = artifact(args.artifact, args.size_mb, tmp)
        files = [p for p in art.rglob("*") if p.is_file()]
        print(f"artifact: {label}, {len(files)} files, {sum(p.stat().st_size for p in files) / 1e6:.1f} MB")
        rows = [bench("local dir", str(tmp / "store"), art, tmp)]
        with moto_server() as url:
            rows.append(bench(f"S3 (moto {url})", f"s3://bench-{uuid.uuid4().hex[:8]}/store", art, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    head = ["store", "MB", "publish s", "publish MB/s", "pull s", "pull MB/s", "2nd publish s", "2nd adds",
            "dedup saving"]
    lines = [[r["store"], f"{r['MB']:.1f}", f"{r['publish_s']:.2f}", f"{r['publish']:.0f}", f"{r['pull_s']:.2f}",
              f"{r['pull']:.0f}", f"{r['second_s']:.2f}", f"{r['added'] / 1e3:.1f} kB", f"{r['saved']:.4%}"]
             for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |")


if __name__ == "__main__":
    main()
