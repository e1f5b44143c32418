#!/usr/bin/env python
"""Check quantkit's in-process llama.cpp throughput against `llama-bench -o json` on the same GGUF files.

    scripts/bench_gguf.py [FILE.gguf ...] [--store URI] [--reps 5] [--rounds 2] [--threads N] [--tolerance 5]

Without files, every GGUF artifact in the store (default $QUANTKIT_STORE or ./model-store) is pulled and
measured. For each file both measurements run back to back, `--rounds` times in alternating order (so drift on
a shared machine does not favour one side; the median round is kept), pp512 and tg128 with the same
repetitions and threads. On a machine other jobs share, use --threads 1: llama.cpp's spinning worker threads
collapse when a core is taken away, and both sides then measure the neighbours rather than llama.cpp.
Prints the table, whether every pair agrees within the tolerance, and the Q4_K_M decode (tg) speedup over F16.
Exit code 1 when a pair disagrees.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantkit.evaluation.engines.llama_cpp_engine import bench, default_threads, gguf_file_type  # noqa: E402
from quantkit.toolchain.llama_cpp import find_tool  # noqa: E402


def llama_bench(path: Path, reps: int, threads: int) -> dict:
    cmd = [str(find_tool("llama-bench")), "-m", str(path), "-p", "512", "-n", "128", "-r", str(reps),
           "-t", str(threads), "-o", "json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"llama-bench failed: {p.stderr[-1500:]}")
    out = {}
    for r in json.loads(p.stdout):
        kind = "pp" if r["n_prompt"] and not r["n_gen"] else "tg"
        out[kind] = {"avg_ts": r["avg_ts"], "stddev_ts": r["stddev_ts"], "samples_ts": r["samples_ts"]}
    return out


def median_round(rounds: list[dict]) -> dict:
    return sorted(rounds, key=lambda r: r["avg_ts"])[len(rounds) // 2]


def store_files(uri: str, dest: Path) -> list[tuple[str, Path]]:
    from quantkit.store.store import Store

    s = Store(uri)
    out = []
    for m in s.list():
        if m["engine"] == "llama.cpp":
            d = s.materialize(m["id"], dest / m["id"])
            out.append((m["target"]["name"], d / m["entry"]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--store", default=os.environ.get("QUANTKIT_STORE", "model-store"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--tolerance", type=float, default=5.0, help="allowed difference, percent")
    ap.add_argument("--json", action="store_true", help="print the records as JSON too")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        files = [(f.stem, f) for f in a.files] or store_files(a.store, Path(tmp))
        if not files:
            print(f"no GGUF files given and none in store {a.store}", file=sys.stderr)
            return 2
        print(f"threads {a.threads}, reps {a.reps}, load average before {os.getloadavg()[0]:.2f}")
        records = []
        for i, (name, path) in enumerate(files):
            runs = [("quantkit", lambda: bench(path, 512, 128, a.reps, a.threads)),
                    ("llama-bench", lambda: llama_bench(path, a.reps, a.threads))]
            got: dict[str, list] = {"quantkit": [], "llama-bench": []}
            for rnd in range(a.rounds):
                for k, fn in (runs if (i + rnd) % 2 == 0 else runs[::-1]):
                    got[k].append(fn())
            res = {k: {kind: median_round([v[kind] for v in vs]) for kind in ("pp", "tg")} for k, vs in got.items()}
            records.append({"name": name, "file": str(path), "type": gguf_file_type(path),
                            "size_mb": round(path.stat().st_size / 1e6, 1), **res})
        print(f"load average after {os.getloadavg()[0]:.2f}\n")

    ok = True
    print(f"{'artifact':<22} {'type':<8} {'MB':>6} | {'test':<6} {'quantkit t/s':>16} {'llama-bench t/s':>16} "
          f"{'diff':>7}")
    for r in records:
        for kind, test in (("pp", "pp512"), ("tg", "tg128")):
            q, b = r["quantkit"][kind], r["llama-bench"][kind]
            diff = 100 * (q["avg_ts"] / b["avg_ts"] - 1)
            r[f"{kind}_diff_pct"] = round(diff, 2)
            ok &= abs(diff) <= a.tolerance
            print(f"{r['name']:<22} {r['type']:<8} {r['size_mb']:>6} | {test:<6} "
                  f"{q['avg_ts']:>9.1f} ± {q['stddev_ts']:<5.1f} {b['avg_ts']:>9.1f} ± {b['stddev_ts']:<5.1f} "
                  f"{diff:>+6.1f}%" + ("" if abs(diff) <= a.tolerance else "  <-- outside"))
    print(f"\nquantkit vs llama-bench within ±{a.tolerance:g}%: {'yes' if ok else 'NO'}")

    by_type = {}
    for r in records:
        by_type.setdefault(r["type"], r)
    if "F16" in by_type and "Q4_K_M" in by_type:
        for src in ("quantkit", "llama-bench"):
            f16, q4 = by_type["F16"][src], by_type["Q4_K_M"][src]
            print(f"Q4_K_M decode speedup over F16 ({src}): {q4['tg']['avg_ts'] / f16['tg']['avg_ts']:.2f}x "
                  f"(tg128 {q4['tg']['avg_ts']:.1f} vs {f16['tg']['avg_ts']:.1f} tok/s; prompt pp512 "
                  f"{q4['pp']['avg_ts'] / f16['pp']['avg_ts']:.2f}x)")
    if a.json:
        print(json.dumps(records, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
