"""A store that distrusts what it reads, on a local directory and on a real S3 API (moto on loopback):
hostile manifests are refused by every reader with one line and nothing written; reading never creates a
store; eval records are append-only; a publish killed by SIGKILL leaves no visible entry.

The hostile suite drives the real CLI in-process (the same `main` as the `quantkit` command) because it makes
hundreds of calls; the one-line/exit-2 contract is what is asserted, as users see it."""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import run_cli
from hostile_manifests import cli, run_suite, tree
from loopback_s3 import bucket_exists
from quantkit.store.manifest import MAX_MANIFEST_BYTES, BadManifest, parse_manifest
from quantkit.store.store import Store
from test_store_backends import fake_manifest, make_artifact

TESTS = Path(__file__).resolve().parent


def _exists(uri: str) -> bool:
    return bucket_exists(uri[5:].split("/", 1)[0]) if uri.startswith("s3://") else Path(uri).exists()


# -- hostile manifests ---------------------------------------------------------------------------------------
def test_hostile_manifests_are_refused_and_nothing_is_written(store_uri, tmp_path):
    pushed = f"s3://qk-{uuid.uuid4().hex[:12]}/pushed" if "://" in store_uri else str(tmp_path / "pushed")
    results = run_suite(store_uri, tmp_path, pushed, make_artifact, fake_manifest)
    assert len(results) >= 5 * 50  # five readers x every case
    for r in results:
        assert r["code"] == 2 and r["err"].count("\n") == 1 and r["id"] in r["err"], r
        assert "refused" in r["err"] and r["expect"] in r["err"] and "Traceback" not in r["err"], r
        assert r["written"] == 0, f"{r['case']}: {r['op']} wrote something"
    assert not _exists(pushed)  # push refused before creating anything at the destination
    assert list((tmp_path / "outside").iterdir()) == [] and not (tmp_path / "escaped").exists()
    # listings refuse too (one line naming a bad manifest); the valid entry still pulls, every file inside
    for args in (("store", "list"), ("report",)):
        code, _, err = cli(*args, "--store", store_uri)
        assert code == 2 and err.count("\n") == 1 and "h." in err, err
    out = Store(store_uri).materialize("h.valid.1", tmp_path / "ok")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == \
        sorted(f["path"] for f in Store(store_uri).raw_manifest("h.valid.1")["files"])


def test_hostile_eval_records_and_names(store_uri, tmp_path):
    st = Store(store_uri)
    st.publish(make_artifact(tmp_path / "art", 2), fake_manifest("e.t.1"))
    st.fs.makedirs(st.evals_dir("e.t.1"), exist_ok=True)
    for body in (b"[1, 2]", b'{"kind": "../x", "key": "k"}', b'{"kind": "perplexity", "key": "k"}', b"{"):
        name = f"{st.evals_dir('e.t.1')}/20260101T000000000000Z-c4-{uuid.uuid4().hex[:8]}.json"
        st.fs.pipe_file(name, body)
        for args in (("store", "show", "e.t.1"), ("store", "pull", "e.t.1", "--to", str(tmp_path / "p")),
                     ("store", "verify", "e.t.1")):
            code, _, err = cli(*args, "--store", store_uri)
            assert code == 2 and "not a valid eval record" in err and err.count("\n") == 1, (body, args, err)
        assert not (tmp_path / "p").exists()
        st.fs.rm_file(name)
    with pytest.raises(BadManifest):  # ids are one path component: never a way out of manifests/ or evals/
        st.manifest_path("../../x")
    with pytest.raises(BadManifest):
        st.blob_path("../../../../etc/passwd")
    assert st.verify() == []


def test_oversized_manifest_is_refused_reading_at_most_the_limit(tmp_path):
    st = Store(str(tmp_path / "s"))
    st.publish(make_artifact(tmp_path / "a", 6), fake_manifest("big.t.1"))
    with open(st.manifest_path("big.t.1"), "r+b") as f:
        f.truncate(16 << 30)  # a 16 GiB (sparse) "manifest": read whole, it would exhaust memory
    with pytest.raises(BadManifest, match="limit"):
        st.raw_manifest("big.t.1")
    with pytest.raises(BadManifest, match="limit"):
        parse_manifest(b" " * (MAX_MANIFEST_BYTES + 1), "manifest x", "x")


def test_cached_remeasure_refuses_a_tampered_manifest(tiny_llama, tmp_path):
    """A real build, then its artifact's manifest is swapped for one with `../../x`; the next build wants a new
    measurement, so it would materialize the artifact: it stops with one line and writes nothing."""
    store = tmp_path / "store"
    recipe = tmp_path / "r.yaml"
    body = f"""\
name: tamper
model: {{source: {tiny_llama}, dtype: float32}}
baseline: false
targets:
  - {{name: fp8-dynamic, format: fp8, scheme: dynamic}}
eval: {{perplexity: {{datasets: [DATASETS], seq_len: 64, max_windows: 2}}}}
store: {{uri: {store}}}
"""
    recipe.write_text(body.replace("DATASETS", "wikitext2"))
    r = run_cli("build", str(recipe), "--json", "--report-dir", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr[-2000:]
    st = Store(str(store))
    (aid,) = st.ids()
    m = st.raw_manifest(aid)
    m["files"][0]["path"] = "../../escaped-by-build"
    st.fs.pipe_file(st.manifest_path(aid), json.dumps(m).encode())
    recipe.write_text(body.replace("DATASETS", "wikitext2, c4"))
    before = tree(tmp_path)
    r = run_cli("build", str(recipe), "--json", "--report-dir", str(tmp_path / "rep"))
    assert r.returncode == 2 and aid in r.stderr and "refused" in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error:") and "Traceback" not in r.stderr
    after = tree(tmp_path)
    assert {k for k in after if k not in before} == set() and not (tmp_path.parent / "escaped-by-build").exists()


# -- reading never creates -------------------------------------------------------------------------------------
def test_read_only_commands_create_nothing(store_uri, tmp_path):
    to = str(tmp_path / "pulled")
    for args in (("store", "list"), ("store", "list", "--json"), ("store", "show", "x"), ("store", "verify"),
                 ("store", "verify", "x"), ("store", "pull", "x", "--to", to), ("store", "push", "--all", "--to",
                 str(tmp_path / "other")), ("store", "rm", "x"), ("store", "gc"), ("report",)):
        code, _, err = cli(*args, "--store", store_uri)
        assert code == 2 and err.count("\n") == 1 and "no store at" in err, (args, err)
        assert not _exists(store_uri), args
    assert list(tmp_path.iterdir()) == []
    Store(store_uri).create()  # an existing but empty store lists as empty
    code, out, _ = cli("store", "list", "--json", "--store", store_uri)
    assert code == 0 and json.loads(out) == []
    code, out, _ = cli("store", "verify", "--store", store_uri)
    assert code == 0 and "0 artifacts checked, 0 problems" in out


# -- eval records are append-only ------------------------------------------------------------------------------
def _ppl(value: float) -> dict:
    return {"kind": "perplexity", "dataset": "c4", "key": "k" * 64, "ppl": value, "protocol": "gptq-c4/1",
            "seq_len": 64, "windows": 2}


def test_eval_records_are_append_only_newest_wins(store_uri, tmp_path):
    st = Store(store_uri)
    st.publish(make_artifact(tmp_path / "a", 4), {**fake_manifest("ev.t.1"), "metrics": {"perplexity": {
        "c4": _ppl(10.0)}}})
    names = [st.add_eval("ev.t.1", _ppl(v)) for v in (9.5, 9.0)]  # the same key twice: two records
    st.add_eval("ev.t.1", {"kind": "throughput", "key": "t" * 64, "engine": "x",
                             "batches": {"1": {"prefill_tok_s": 100.0, "decode_tok_s": 10.0}}})
    assert len(set(names)) == 2 and len(st.eval_files("ev.t.1")) == 3
    assert st.get("ev.t.1")["metrics"]["perplexity"]["c4"]["ppl"] == 9.0  # the newest of its kind
    assert st.raw_manifest("ev.t.1")["metrics"]["perplexity"]["c4"]["ppl"] == 10.0  # the manifest is untouched
    code, out, _ = cli("store", "show", "ev.t", "--store", store_uri)
    shown = json.loads(out)
    assert code == 0 and [r["ppl"] for r in shown["eval_history"] if r["kind"] == "perplexity"] == [9.5, 9.0]
    code, out, _ = cli("report", "--format", "json", "--store", store_uri)
    assert code == 0 and json.loads(out)[0]["ppl"]["c4"]["ppl"] == 9.0
    # push copies the lineage; pushing again adds nothing and replaces nothing
    dest = str(tmp_path / "copy") if "://" not in store_uri else f"s3://qk-{uuid.uuid4().hex[:12]}/copy"
    for _ in range(2):
        code, _, err = cli("store", "push", "ev.t.1", "--to", dest, "--store", store_uri)
        assert code == 0, err
    copy = Store(dest)
    assert [r for _, r in copy.eval_records("ev.t.1")] == [r for _, r in st.eval_records("ev.t.1")]
    assert copy.get("ev.t.1")["metrics"] == st.get("ev.t.1")["metrics"]


# -- kill -9 during publish ------------------------------------------------------------------------------------
@pytest.mark.slow  # two real builds per case (the killed one and the rerun), each a fresh process importing torch
@pytest.mark.parametrize("backend,point", [("local", "blob:2"), ("s3", "manifest:2")])
def test_publish_killed_by_sigkill_leaves_no_entry(backend, point, tiny_llama, tmp_path, request):
    """SIGKILL injected from outside quantkit (tests/fault_inject.py wraps the store's writer) in the middle of
    the target's blob uploads, or just before its manifest (the baseline's, with no files, is the first):
    no visible entry, the rerun completes, verify is clean. (Random-time kills: scripts/bench_store_safety.py.)"""
    store_uri = str(tmp_path / "store")
    if backend == "s3":
        request.getfixturevalue("s3_endpoint")
        store_uri = f"s3://qk-{uuid.uuid4().hex[:12]}/kill"
    recipe = tmp_path / "k.yaml"
    recipe.write_text(f"""\
name: kill
model: {{source: {tiny_llama}, dtype: float32}}
targets:
  - {{name: fp8-dynamic, format: fp8, scheme: dynamic}}
eval: {{perplexity: {{datasets: [wikitext2], seq_len: 64, max_windows: 2}}}}
store: {{uri: "{store_uri}"}}
""")
    r = subprocess.run([sys.executable, str(TESTS / "fault_inject.py"), point, "build", str(recipe), "--target",
                        "fp8-dynamic", "--report-dir", str(tmp_path / "rep")], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-2000:]
    st = Store(store_uri)
    assert [m["target"]["name"] for m in st.list()] == ["baseline"]  # no files: published before the target
    assert st.fs.find(st._p("blobs"))  # the kill really landed mid-publish: blobs are up, no manifest
    assert st.verify() == []
    r = run_cli("build", str(recipe), "--json", "--report-dir", str(tmp_path / "rep"))
    assert r.returncode == 0 and len(json.loads(r.stdout)["built"]) == 1, r.stderr[-2000:]
    r = run_cli("store", "verify", "--store", store_uri)
    assert r.returncode == 0 and "2 artifacts checked, 0 problems" in r.stdout, r.stdout + r.stderr


def test_longest_id_round_trips(tmp_path):
    """Names are bounded by the recipe schema (96 characters each); the longest id they make still fits one
    file name (manifests/<id>.json) and the pull's temporary sibling directory."""
    aid = "r" * 96 + "." + "t" * 140 + "." + "0" * 12
    st = Store(str(tmp_path / "s"))
    st.publish(make_artifact(tmp_path / "a", 5), fake_manifest(aid))
    out = st.materialize(aid, tmp_path / "pulled" / aid)
    assert len(list(out.rglob("*.safetensors"))) == 2 and st.verify() == []
