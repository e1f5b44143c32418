"""The store on a local directory, file:// and a real S3 API (moto's server on 127.0.0.1, spoken to through s3fs
exactly as users do: s3:// URIs and AWS_ENDPOINT_URL). Concurrency is tested with real processes.

Run as a script, this file is one publisher: `python test_store_backends.py URI ID SEED BARRIER_DIR`."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import run_cli
from quantkit.store.store import Store

MB = 1 << 20
SHARED = {"tokenizer.json": 1 * MB, "shared/extra.bin": MB // 2}  # the same bytes in every artifact
UNIQUE = {"model-00001.safetensors": 2 * MB, "model-00002.safetensors": MB}  # different per artifact


def make_artifact(dest: Path, seed: int) -> Path:
    for name, size in SHARED.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(random.Random(f"shared-{name}").randbytes(size))
    for name, size in UNIQUE.items():
        (dest / name).write_bytes(random.Random(f"{seed}-{name}").randbytes(size))
    return dest


def fake_manifest(artifact_id: str, fmt: str = "fp8", recipe: str = "conc", gate: str | None = None) -> dict:
    m = {"id": artifact_id, "recipe": {"name": recipe}, "source": {"uri": "models/tiny", "fingerprint": "f" * 64},
         "engine": "transformers", "entry": ".", "created_at": "2026-01-01T00:00:00+00:00", "info": {},
         "writer": os.getpid(),
         "target": {"name": artifact_id.split(".")[1], "format": fmt, "scheme": fmt}}
    if gate:
        m["gate"] = {"status": gate}
    return m


def _publisher(uri: str, artifact_id: str, seed: int, barrier: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        staging = make_artifact(Path(tmp), seed)
        st = Store(uri)
        (barrier / f"ready-{os.getpid()}").touch()
        while not (barrier / "go").exists():  # all eight start writing together
            time.sleep(0.005)
        t0 = time.time()
        manifest = st.publish(staging, fake_manifest(artifact_id))
        print(json.dumps({"manifest": manifest, "t0": t0, "t1": time.time()}))


def _max_in_flight(spans: list[tuple[float, float]]) -> int:
    events = sorted([(t0, 1) for t0, _ in spans] + [(t1, -1) for _, t1 in spans])
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def _blob_bytes(st: Store) -> int:
    return sum(i["size"] for i in st.fs.find(st._p("blobs"), detail=True).values())


# -- concurrency ---------------------------------------------------------------------------------------------
def test_eight_concurrent_publishers_lose_and_corrupt_nothing(store_uri, tmp_path):
    Store(store_uri).create()  # the bucket exists before the race (creating buckets is not what is tested)
    jobs = [(f"conc.t{i}.{i:012d}", i) for i in range(7)] + [("conc.t0.000000000000", 0)]  # 2 x the same
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, __file__, store_uri, aid, str(seed), str(barrier)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for aid, seed in jobs]
    deadline = time.time() + 120
    while len(list(barrier.glob("ready-*"))) < 8 and time.time() < deadline and \
            all(p.poll() is None for p in procs):
        time.sleep(0.05)
    (barrier / "go").touch()
    reader, listings = Store(store_uri), 0
    while any(p.poll() is None for p in procs) and listings < 200:  # listing while they write
        for m in reader.list():  # whatever is listed is complete: manifest parses, its blobs are all there
            assert len(m["files"]) == len(SHARED) + len(UNIQUE)
            assert all(reader.has_blob(f["sha256"]) for f in m["files"])
        listings += 1
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [e[-1500:] for _, e in outs]
    results = [json.loads(o) for o, _ in outs]
    assert _max_in_flight([(r["t0"], r["t1"]) for r in results]) >= 4  # they really overlapped
    st = Store(store_uri)
    assert st.ids() == sorted({aid for aid, _ in jobs})  # 7 entries: the duplicate publish is one entry
    twins = [results[i]["manifest"] for i in (0, 7)]
    assert twins[0]["writer"] == twins[1]["writer"]  # both publishers got back the one manifest that won
    assert st.verify() == []  # every manifest parses and every blob re-hashes to its name
    manifests = list(st.list())
    assert all(len(m["files"]) == len(SHARED) + len(UNIQUE) for m in manifests)
    shared, unique = sum(SHARED.values()), sum(UNIQUE.values())
    assert sum(m["total_size"] for m in manifests) == 7 * (shared + unique)
    assert _blob_bytes(st) == shared + 7 * unique  # dedup: the shared files are stored once
    if "://" not in store_uri:
        assert not list(Path(store_uri, "tmp").glob("*"))  # no staging leftovers from successful publishes


@pytest.mark.parametrize("uri_form", ["local", "file", "memory"])
def test_uri_forms_publish_and_pull(uri_form, tmp_path):
    uri = {"local": str(tmp_path / "s"), "file": f"file://{tmp_path}/s",
           "memory": f"memory://qk-{uuid.uuid4().hex[:8]}"}[uri_form]
    st = Store(uri)
    st.publish(make_artifact(tmp_path / "a", 1), fake_manifest("x.a.1"))
    assert st.publish(make_artifact(tmp_path / "b", 1), fake_manifest("x.a.1"))["files"]  # same id: no error
    out = st.materialize("x.a.1", tmp_path / "pulled")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == \
        sorted([*SHARED, *UNIQUE])
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "a" / "tokenizer.json").read_bytes()
    assert st.ids() == ["x.a.1"] and st.verify() == []


def test_manifest_is_written_once(store_uri):
    st = Store(store_uri)
    st.create()
    path = st.manifest_path("w.once.1")
    assert st.writer.create_bytes(b'{"id": "first"}', path) is True
    assert st.writer.create_bytes(b'{"id": "second"}', path) is False  # conditional PUT / os.link refused
    assert json.loads(st.fs.cat_file(path)) == {"id": "first"}


def _ino(p) -> int:
    return os.stat(p).st_ino


def test_a_builds_staging_is_linked_into_a_local_store_not_copied(tmp_path):
    """publish(link=True), as a build publishes its staging directory: on the same filesystem each blob is the
    staging file's own inode (no second write of the artifact). A file that has another name elsewhere (a
    cache, a source checkpoint) and a symlink are copied, since they could change in place under that name.
    Deleting the staging leaves every blob whole (verify, pull); without link=True the store copies."""
    st = Store(str(tmp_path / "store"))
    staging = make_artifact(tmp_path / "stage", 1)
    elsewhere, target = tmp_path / "cache.bin", tmp_path / "target.bin"
    elsewhere.write_bytes(b"cached " * 1000)
    target.write_bytes(b"symlinked " * 1000)
    os.link(elsewhere, staging / "hardlinked.bin")
    (staging / "symlinked.bin").symlink_to(target)
    before = {p.relative_to(staging).as_posix(): p.read_bytes() for p in staging.rglob("*") if p.is_file()}
    m = st.publish(staging, fake_manifest("ln.t.1"), link=True)
    blob = {f["path"]: st.blob_path(f["sha256"]) for f in m["files"]}
    for name in [*SHARED, *UNIQUE]:
        assert _ino(blob[name]) == _ino(staging / name), name  # taken, not copied
    assert _ino(blob["hardlinked.bin"]) != _ino(elsewhere)
    assert _ino(blob["symlinked.bin"]) != _ino(target)
    assert not os.listdir(st._p("tmp"))  # every link renamed into place
    shutil.rmtree(staging)
    elsewhere.write_bytes(b"changed " * 1000)  # in place, under its other name
    target.write_bytes(b"changed " * 1000)
    assert st.verify() == []
    pulled = st.materialize("ln.t.1", tmp_path / "pulled")
    assert {n: (pulled / n).read_bytes() for n in before} == before
    m2 = st.publish(make_artifact(tmp_path / "copied", 2), fake_manifest("ln.t.2"))  # link=False: copies
    name = "model-00001.safetensors"
    assert _ino(st.blob_path(next(f["sha256"] for f in m2["files"] if f["path"] == name))) != \
        _ino(tmp_path / "copied" / name)


def test_linking_across_filesystems_falls_back_to_a_copy(tmp_path):
    """A staging directory on another filesystem than the store (here /dev/shm, a tmpfs): no hard link is
    possible, the files are copied and the entry is complete."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a second filesystem (/dev/shm) beside the test's tmp dir")
    with tempfile.TemporaryDirectory(dir=shm) as d:
        staging = make_artifact(Path(d), 3)
        m = Store(str(tmp_path / "store")).publish(staging, fake_manifest("ln.x.1"), link=True)
        assert len(m["files"]) == len(SHARED) + len(UNIQUE)
    assert Store(str(tmp_path / "store")).verify() == []


# -- pull, push, rm, gc, list ----------------------------------------------------------------------------------
def test_pull_verifies_hashes_and_refuses_a_corrupt_blob(store_uri, tmp_path):
    st = Store(store_uri)
    m = st.publish(make_artifact(tmp_path / "a", 3), fake_manifest("p.pull.1"))
    r = run_cli("store", "pull", "p.pull", "--to", str(tmp_path / "good"), "--store", store_uri)
    assert r.returncode == 0 and "all hashes ok" in r.stdout, r.stderr
    assert (tmp_path / "good" / "model-00002.safetensors").read_bytes() == \
        (tmp_path / "a" / "model-00002.safetensors").read_bytes()
    victim = next(f for f in m["files"] if f["path"] == "model-00001.safetensors")
    data = bytearray(st.fs.cat_file(st.blob_path(victim["sha256"])))
    data[12345] ^= 0xFF
    st.fs.pipe_file(st.blob_path(victim["sha256"]), bytes(data))
    r = run_cli("store", "pull", "p.pull.1", "--to", str(tmp_path / "bad"), "--store", store_uri)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "corrupt" in r.stderr and "model-00001.safetensors" in r.stderr
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.partial-*"))


def test_push_local_to_s3_copies_blobs_once(s3_endpoint, tmp_path):
    local = Store(str(tmp_path / "local"))
    for i in (1, 2):
        local.publish(make_artifact(tmp_path / f"a{i}", i), fake_manifest(f"push.t{i}.{i}"))
    local.add_eval("push.t1.1", {"kind": "perplexity", "dataset": "c4", "key": "k" * 64, "ppl": 9.5,
                                 "protocol": "gptq-c4/1", "seq_len": 64, "windows": 2})
    dest = f"s3://qk-{uuid.uuid4().hex[:12]}/store"
    r = run_cli("store", "push", "push.t1", "--to", dest, "--store", local.uri)
    assert r.returncode == 0 and "1 pushed" in r.stdout, r.stderr
    r = run_cli("store", "push", "--all", "--to", dest, "--store", local.uri)
    assert r.returncode == 0 and "1 pushed, 1 already there" in r.stdout, r.stdout
    assert f"{sum(SHARED.values()) / 1e6:.1f} MB already present" in r.stdout  # only the unique files moved
    s3 = Store(dest)
    assert s3.ids() == local.ids() and s3.verify() == []
    assert s3.get("push.t1.1")["metrics"]["perplexity"]["c4"]["ppl"] == 9.5
    assert _blob_bytes(s3) == _blob_bytes(local) == sum(SHARED.values()) + 2 * sum(UNIQUE.values())
    out = s3.materialize("push.t2.2", tmp_path / "from-s3")
    assert (out / "model-00001.safetensors").read_bytes() == (tmp_path / "a2" / "model-00001.safetensors").read_bytes()


def test_gc_keeps_what_live_manifests_reference(store_uri, tmp_path):
    st = Store(store_uri)
    for i in (1, 2):
        st.publish(make_artifact(tmp_path / f"a{i}", i), fake_manifest(f"gc.t{i}.{i}"))
    orphan = make_artifact(tmp_path / "inflight", 9)  # a publish in flight: blobs up, no manifest yet
    inflight = st.publish(orphan, fake_manifest("gc.t9.9"))
    st.fs.rm_file(st.manifest_path("gc.t9.9"))
    r = run_cli("store", "rm", "gc.t1", "--store", store_uri)
    assert r.returncode == 0 and st.ids() == ["gc.t2.2"]
    r = run_cli("store", "gc", "--older-than", "1h", "--store", store_uri)  # everything is young: all kept
    assert r.returncode == 0 and "removed 0 unreferenced blobs" in r.stdout, r.stdout
    assert all(st.has_blob(f["sha256"]) for f in inflight["files"])
    if "://" not in store_uri:  # a local disk lets the test age files; then 1h removes the old ones only
        old = time.time() - 7200
        stale_tmp = Path(store_uri, "tmp", "leftover")
        stale_tmp.parent.mkdir(exist_ok=True)
        stale_tmp.write_bytes(b"partial")
        for p in [*Path(store_uri, "blobs").rglob("*"), stale_tmp]:
            os.utime(p, (old, old))
        young = st.blob_path(next(f["sha256"] for f in inflight["files"] if f["path"] == "model-00002.safetensors"))
        os.utime(young)
        r = run_cli("store", "gc", "--older-than", "1h", "--store", store_uri)
        assert r.returncode == 0 and "1 staging files" in r.stdout and "younger than 1h" in r.stdout, r.stdout
        assert st.has_blob(Path(young).name) and not stale_tmp.exists()
    r = run_cli("store", "gc", "--older-than", "0s", "--store", store_uri)
    assert r.returncode == 0, r.stderr
    live = Store(store_uri).raw_manifest("gc.t2.2")["files"]
    assert st.verify() == [] and _blob_bytes(st) == sum(f["size"] for f in live)


def test_list_filters_and_json(tmp_path):
    st = Store(str(tmp_path / "s"))
    for aid, fmt, recipe, gate in [("a.fp8.1", "fp8", "r1", "passed"), ("a.gguf.2", "gguf", "r1", "failed"),
                                   ("b.fp8.3", "fp8", "r2", None)]:
        st.publish(make_artifact(tmp_path / aid, 1), fake_manifest(aid, fmt, recipe, gate))

    def ids(*args: str) -> list[str]:
        r = run_cli("store", "list", "--json", "--store", st.uri, *args)
        assert r.returncode == 0, r.stderr
        return [m["id"] for m in json.loads(r.stdout)]

    assert ids() == ["a.fp8.1", "a.gguf.2", "b.fp8.3"]
    assert ids("--format", "fp8") == ["a.fp8.1", "b.fp8.3"]
    assert ids("--recipe", "r1") == ["a.fp8.1", "a.gguf.2"] and ids("--model", "tiny") == ids()
    # a gate status frozen in a manifest is never believed: verdicts come from a recipe's current gates
    # (tests/test_report_gates_planner.py), so --gate without --recipe-file is one line, exit 2
    assert run_cli("store", "list", "--gate", "failed", "--store", st.uri).returncode == 2
    assert ids("--model", "llama-70b") == []
    r = run_cli("store", "list", "--gate", "maybe", "--store", st.uri)
    assert r.returncode == 2


def test_build_and_report_on_s3_through_the_recipe(s3_endpoint, tiny_llama, tmp_path):
    """A user's path: recipe store.uri s3://..., endpoint from the recipe's store.options (the environment's
    AWS_ENDPOINT_URL points nowhere for the build, so the option must be what is used), then report."""
    bucket = f"s3://qk-{uuid.uuid4().hex[:12]}/models"
    recipe = tmp_path / "tiny-s3.yaml"
    recipe.write_text(f"""\
name: tiny-s3
model: {{source: {tiny_llama}, dtype: float32}}
targets:
  - {{name: fp8-dynamic, format: fp8, scheme: dynamic}}
eval: {{perplexity: {{datasets: [wikitext2], seq_len: 64, max_windows: 2}}}}
store: {{uri: "{bucket}", options: {{endpoint_url: "{s3_endpoint}"}}}}
""")
    r = run_cli("build", str(recipe), "--json", "--report-dir", str(tmp_path / "rep"),
                env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(json.loads(r.stdout)["built"]) == 2
    r = run_cli("report", "--store", bucket, "--recipe", "tiny-s3", "--format", "md")
    assert r.returncode == 0 and "fp8-dynamic" in r.stdout and "baseline" in r.stdout, r.stderr
    st = Store(bucket)
    assert len(st.ids()) == 2 and st.verify() == []
    r = run_cli("build", str(recipe), "--json", "--report-dir", str(tmp_path / "rep2"))
    assert r.returncode == 0 and json.loads(r.stdout)["built"] == []  # cache hits, read back from S3


if __name__ == "__main__":
    _publisher(sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
