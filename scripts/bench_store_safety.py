"""The store's safety claims, measured (issue 12): kill -9 at random moments of a real multi-target build, eight
concurrent publishers into S3, and every hostile-manifest trick against every reader.

    .venv/bin/python scripts/bench_store_safety.py [--kills 20] [--rounds 5] [--seed 0] [--json OUT]

1. Kills: a tiny random Llama (tests/conftest.make_tiny_llama) and a recipe with baseline + FP8 dynamic +
   INT8 W8A16 RTN; one clean build gives the build's wall time T; then, per trial, a fresh store (a local
   directory, or a new bucket on a loopback moto S3 server), `quantkit build` killed with SIGKILL after
   uniform(0, T) seconds, and a look at the store: every visible entry must parse and re-hash (a "partial
   entry" is one that does not); then the same build again must finish with all 3 entries, and
   `quantkit store verify` must say 0 problems.
2. Concurrency: per round a new bucket, 8 publisher processes released together, 4 artifact ids x 2
   publishers each, every artifact sharing two files with all others; lost = an id missing afterwards,
   corrupt = a manifest that fails the schema or whose blobs do not re-hash.
3. Hostile manifests: tests/hostile_manifests.py's cases against pull, push, verify, show (the CLI) and
   materialize (what a cached re-measure calls), local and S3; counts refusals and files written anywhere.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import make_tiny_llama  # noqa: E402
from hostile_manifests import run_suite  # noqa: E402
from loopback_s3 import moto_server  # noqa: E402
from quantkit.store.manifest import BadManifest  # noqa: E402
from quantkit.store.store import Store  # noqa: E402
from test_store_backends import SHARED, UNIQUE, fake_manifest, make_artifact  # noqa: E402

QK = [sys.executable, "-m", "quantkit.cli"]
TARGETS = ["baseline", "fp8-dynamic", "int8-w8a16"]


def recipe(tmp: Path, model: Path, store: str) -> Path:
    f = tmp / f"kill-{uuid.uuid4().hex[:6]}.yaml"
    f.write_text(f"""\
name: killbench
model: {{source: {model}, dtype: float32}}
targets:
  - {{name: fp8-dynamic, format: fp8, scheme: dynamic}}
  - {{name: int8-w8a16, format: int8, scheme: w8a16, algorithm: rtn}}
eval: {{perplexity: {{datasets: [wikitext2], seq_len: 64, max_windows: 2}}}}
store: {{uri: "{store}"}}
""")
    return f


def stage_at_kill(stderr: str) -> str:
    """The last progress line the killed build printed: where it was."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    marks = [ln for ln in lines if any(w in ln for w in ("building", "produced", "ppl", "published",
                                                         "calibration"))]
    return " ".join((marks[-1] if marks else "starting (imports, plan)").split())[:70]


def inspect(uri: str) -> dict:
    """Visible entries and how many of them are partial (fail the schema or a blob re-hash)."""
    st = Store(uri)
    ids = st.ids()
    partial = []
    for i in ids:
        try:
            if st.verify(i):
                partial.append(i)
        except BadManifest:
            partial.append(i)
    return {"visible": len(ids), "partial": len(partial), "targets": sorted(i.split(".")[1] for i in ids)}


def kill_trials(kind: str, n: int, rng: random.Random, tmp: Path, model: Path) -> dict:
    new_uri = (lambda: f"s3://kill-{uuid.uuid4().hex[:10]}/store") if kind == "s3" else \
        (lambda: str(tmp / f"store-{uuid.uuid4().hex[:8]}"))
    uri = new_uri()
    t0 = time.perf_counter()
    r = subprocess.run([*QK, "build", str(recipe(tmp, model, uri)), "--report-dir", str(tmp / "rep")],
                       capture_output=True, text=True)
    full = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"reference build failed:\n{r.stderr[-3000:]}")
    print(f"[{kind}] reference build: {full:.1f} s, {inspect(uri)}", flush=True)
    trials = []
    for k in range(n):
        uri = new_uri()
        rec = recipe(tmp, model, uri)
        log = tmp / f"killed-{k}.log"
        finished_first = 0
        while True:  # a draw past the end of this (faster) build is drawn again, within its own length
            at = rng.uniform(0, full)
            t1 = time.perf_counter()
            with open(log, "w") as err:
                p = subprocess.Popen([*QK, "build", str(rec), "--report-dir", str(tmp / "rep")],
                                     stdout=subprocess.DEVNULL, stderr=err)
                try:
                    p.wait(timeout=at)
                    killed = False
                except subprocess.TimeoutExpired:
                    p.send_signal(signal.SIGKILL)
                    p.wait()
                    killed = True
            if killed or finished_first == 3:
                break
            finished_first += 1
            full = min(full, time.perf_counter() - t1)
            uri = new_uri()
            rec = recipe(tmp, model, uri)
        seen = inspect(uri) if Store(uri).exists() else {"visible": 0, "partial": 0, "targets": []}
        t1 = time.perf_counter()
        again = subprocess.run([*QK, "build", str(rec), "--json", "--report-dir", str(tmp / "rep")],
                               capture_output=True, text=True)
        rerun_s = time.perf_counter() - t1
        done = again.returncode == 0 and len(json.loads(again.stdout)["rows"]) == len(TARGETS)
        verify = subprocess.run([*QK, "store", "verify", "--store", uri], capture_output=True, text=True)
        trial = {"kill_at_s": round(at, 2), "killed": killed, "redrawn": finished_first, "stage": stage_at_kill(log.read_text()),
                 "visible_after_kill": seen["visible"], "partial_entries": seen["partial"],
                 "targets_after_kill": seen["targets"], "rerun_ok": done, "rerun_s": round(rerun_s, 1),
                 "rerun_built": len(json.loads(again.stdout)["built"]) if again.returncode == 0 else None,
                 "verify_ok": verify.returncode == 0 and "0 problems" in verify.stdout,
                 "verify": verify.stdout.strip().splitlines()[-1] if verify.stdout.strip() else verify.stderr[-200:]}
        trials.append(trial)
        print(f"[{kind}] {k + 1}/{n} " + json.dumps(trial), flush=True)
    return {"store": kind, "reference_build_s": round(full, 1), "trials": trials}


def publisher_race(rounds: int, tmp: Path) -> dict:
    out = []
    for r in range(rounds):
        uri = f"s3://race-{uuid.uuid4().hex[:10]}/store"
        Store(uri).create()
        barrier = tmp / f"barrier-{r}"
        barrier.mkdir()
        jobs = [(f"race.t{i % 4}.{i % 4:012d}", i % 4) for i in range(8)]
        procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "test_store_backends.py"), uri, aid,
                                   str(seed), str(barrier)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for aid, seed in jobs]
        while len(list(barrier.glob("ready-*"))) < 8 and all(p.poll() is None for p in procs):
            time.sleep(0.05)
        t0 = time.perf_counter()
        (barrier / "go").touch()
        results = [p.communicate(timeout=600) for p in procs]
        wall = time.perf_counter() - t0
        failed = sum(p.returncode != 0 for p in procs)
        st = Store(uri)
        want = sorted({aid for aid, _ in jobs})
        lost = len(set(want) - set(st.ids()))
        corrupt = 0
        for i in st.ids():
            try:
                corrupt += bool(st.verify(i))
            except BadManifest:
                corrupt += 1
        blobs = sum(v["size"] for v in st.fs.find(st._p("blobs"), detail=True).values())
        row = {"round": r + 1, "publishers": len(jobs), "ids": len(want), "failed_publishers": failed,
               "lost": lost, "corrupt": corrupt, "wall_s": round(wall, 2), "blob_bytes": blobs,
               "blob_bytes_if_deduped": sum(SHARED.values()) + len(want) * sum(UNIQUE.values()),
               "errors": [e[-300:] for _, e in results if e.strip()][:2]}
        out.append(row)
        print("[race] " + json.dumps(row), flush=True)
    return {"rounds": out}


def hostile(kind: str, tmp: Path) -> dict:
    base = tmp / f"hostile-{kind}"
    base.mkdir()
    uri = f"s3://hostile-{uuid.uuid4().hex[:10]}/store" if kind == "s3" else str(base / "store")
    pushed = f"s3://hostile-{uuid.uuid4().hex[:10]}/pushed" if kind == "s3" else str(base / "pushed")
    rs = run_suite(uri, base, pushed, make_artifact, fake_manifest)
    one_line = sum(r["code"] == 2 and r["err"].count("\n") == 1 and r["expect"] in r["err"] for r in rs)
    return {"store": kind, "cases": len({r["case"] for r in rs}), "operations": len(rs), "refused": one_line,
            "files_written": sum(r["written"] for r in rs[::5]),
            "outside_dir_entries": len(list((base / "outside").iterdir())),
            "not_refused": sorted({f"{r['case']}/{r['op']}" for r in rs if r["code"] != 2})}


def render(res: dict) -> str:
    """Markdown: the summary lines, then one row per kill trial (what docs/benchmarks/store/ holds)."""
    out = []
    for h in res.get("hostile", []):
        out.append(f"- hostile manifests ({h['store']}): {h['cases']} cases x 5 readers = {h['operations']} operations, "
                   f"{h['refused']} refused with one line naming the manifest and the problem (exit 2), "
                   f"**{h['files_written']} files written** anywhere, {h['outside_dir_entries']} in the target of "
                   "the absolute-path cases")
    if "race" in res:
        rs = res["race"]["rounds"]
        out.append(f"- 8 concurrent publishers x {len(rs)} rounds into S3 (4 ids x 2 publishers, shared files): "
                   f"**lost {sum(r['lost'] for r in rs)}, corrupt {sum(r['corrupt'] for r in rs)}**, failed "
                   f"publishers {sum(r['failed_publishers'] for r in rs)}, blob bytes = deduplicated size in "
                   f"{sum(r['blob_bytes'] == r['blob_bytes_if_deduped'] for r in rs)}/{len(rs)} rounds, wall "
                   f"{min(r['wall_s'] for r in rs)}-{max(r['wall_s'] for r in rs)} s per round")
    for k in res.get("kills", []):
        t = k["trials"]
        out.append(f"- kill -9 into {k['store']} (clean build {k['reference_build_s']} s): {len(t)} trials, "
                   f"{sum(x['killed'] for x in t)} killed before the build ended, **partial entries "
                   f"{sum(x['partial_entries'] for x in t)}**, reruns complete {sum(x['rerun_ok'] for x in t)}/"
                   f"{len(t)}, `store verify` clean {sum(x['verify_ok'] for x in t)}/{len(t)}")
    for k in res.get("kills", []):
        out += ["", f"kill -9 trials, {k['store']} store:", "",
                "| # | killed at s | where the build was | entries visible | partial | rerun built | rerun s | verify |",
                "|---|---|---|---|---|---|---|---|"]
        for i, x in enumerate(k["trials"], 1):
            stage = " ".join(x["stage"].split()).replace("|", "/")
            out.append(f"| {i} | {x['kill_at_s']}{'' if x['killed'] else ' (had finished)'} | {stage} | "
                       f"{x['visible_after_kill']} | {x['partial_entries']} | {x['rerun_built']} | {x['rerun_s']} | "
                       f"{x['verify']} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="kill trials per store kind")
    ap.add_argument("--rounds", type=int, default=5, help="8-publisher race rounds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["kills", "race", "hostile"], action="append")
    ap.add_argument("--stores", default="local,s3", help="kill trials into these: local, s3 or both")
    ap.add_argument("--json", type=Path, help="write all results here")
    ap.add_argument("--render", type=Path, help="only print the markdown of an earlier --json result")
    args = ap.parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text())), end="")
        return
    only = set(args.only or ["kills", "race", "hostile"])
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="quantkit-bench-safety-"))
    res: dict = {"seed": args.seed}
    try:
        with moto_server() as url:
            res["s3_endpoint"] = url
            if "hostile" in only:
                res["hostile"] = [hostile(k, tmp) for k in ("local", "s3")]
            if "race" in only:
                res["race"] = publisher_race(args.rounds, tmp)
            if "kills" in only:
                model = make_tiny_llama(tmp / "tiny-llama")
                res["kills"] = [kill_trials(k, args.kills, rng, tmp, model) for k in args.stores.split(",")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    print()
    print(render(res), end="")


if __name__ == "__main__":
    main()
