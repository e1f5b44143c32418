"""Manifests a hostile or broken publisher could put into a shared store, built from a real published one.

Each case is (name, bytes to store as manifests/<id>.json). The valid manifest's files point at real blobs with
real hashes, so for the path tricks only validation stands between the store and a write outside the
destination. `run_suite` tries every case against every reader; tests/test_store_trust.py asserts on its
results and scripts/bench_store_safety.py counts them."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import sys
from pathlib import Path


def _path_tricks(outside: Path) -> dict[str, str]:
    """File paths that, joined naively to a destination, land elsewhere or mean something else on some OS."""
    return {
        "dotdot": "../escaped",
        "dotdot-2": "../../escaped",
        "dotdot-deep": "../" * 40 + "tmp/escaped",
        "inner-dotdot": "a/../../escaped",
        "trailing-dotdot": "a/..",
        "dot": ".",
        "dot-component": "a/./b",
        "absolute": str(outside / "escaped-absolute"),
        "absolute-root": "/escaped",
        "home": "~/escaped",
        "empty": "",
        "double-slash": "a//b",
        "trailing-slash": "dir/",
        "backslash": "..\\..\\escaped",
        "backslash-inner": "a\\b",
        "drive": "C:\\escaped",
        "drive-relative": "C:escaped",
        "unc": "\\\\server\\share\\escaped",
        "nul": "x\x00y",
        "newline": "x\ny",
        "ads-colon": "model.safetensors:stream",
        "too-long": "a" * 2000,
        "long-component": "b" * 300,
    }


def case_id(name: str) -> str:
    """The artifact id a case is stored under (its manifest claims this id, so only the trick is wrong)."""
    return "h." + name.replace(":", "-") + ".1"


def hostile_cases(valid: dict, outside: Path) -> list[tuple[str, str, bytes]]:
    """(name, a word the refusal must contain, bytes) for each trick. valid: a published manifest with at least
    two files. outside: a directory nothing may be written into."""
    assert len(valid["files"]) >= 2
    cases: list[tuple[str, str, bytes]] = []

    def mutated(name: str, expect: str, change) -> None:
        m = copy.deepcopy(valid)
        m["id"] = case_id(name)
        change(m)
        cases.append((name, expect, json.dumps(m).encode()))

    def set_path(p: str):
        def change(m):
            m["files"][0]["path"] = p
        return change

    for name, p in _path_tricks(outside).items():
        mutated(f"path:{name}", "files.0.path", set_path(p))
    # symlink-ish and collision tricks: a file where a directory must be, the same name twice (or in two cases
    # on a case-insensitive disk), and the entry (what the engine opens) pointing out of the artifact
    f0, f1 = valid["files"][0], valid["files"][1]
    mutated("file-and-dir", "directory", lambda m: m["files"].__setitem__(1, {**f1, "path": f0["path"] + "/inner"}))
    mutated("duplicate-path", "twice", lambda m: m["files"].__setitem__(1, {**f1, "path": f0["path"]}))
    mutated("duplicate-casefold", "twice", lambda m: m["files"].__setitem__(1, {**f1, "path": f0["path"].upper()}))
    mutated("entry-escapes", "escaped", lambda m: m.__setitem__("entry", "../../escaped"))
    # sizes and hashes
    mutated("size-huge", "size", lambda m: (m["files"][0].__setitem__("size", 10 ** 30),
                                            m.__setitem__("total_size", 10 ** 30)))
    mutated("size-negative", "size", lambda m: m["files"][0].__setitem__("size", -1))
    mutated("size-string", "size", lambda m: m["files"][0].__setitem__("size", str(f0["size"])))
    mutated("size-bool", "size", lambda m: m["files"][0].__setitem__("size", True))
    mutated("total-size-wrong", "total_size", lambda m: m.__setitem__("total_size", m["total_size"] + 1))
    mutated("hash-path", "sha256", lambda m: m["files"][0].__setitem__("sha256", "../../../../../../etc/passwd"))
    mutated("hash-short", "sha256", lambda m: m["files"][0].__setitem__("sha256", f0["sha256"][:40]))
    mutated("hash-upper", "sha256", lambda m: m["files"][0].__setitem__("sha256", f0["sha256"].upper()))
    mutated("hash-nonhex", "sha256", lambda m: m["files"][0].__setitem__("sha256", "z" * 64))
    mutated("file-extra-key", "mode", lambda m: m["files"][0].__setitem__("mode", "symlink"))
    mutated("file-not-object", "files.0", lambda m: m["files"].__setitem__(0, f0["path"]))
    mutated("files-not-list", "files", lambda m: m.__setitem__("files", {"a": f0}))
    mutated("files-missing", "files", lambda m: m.pop("files"))
    # identity
    mutated("id-other", "claims id", lambda m: m.__setitem__("id", "some.other.000000000000"))
    mutated("id-traversal", "id", lambda m: m.__setitem__("id", "../../x"))
    mutated("schema-unknown", "schema", lambda m: m.__setitem__("schema", "quantkit.manifest/99"))
    mutated("recipe-not-object", "recipe", lambda m: m.__setitem__("recipe", "r"))
    mutated("metrics-garbage", "metrics", lambda m: m.__setitem__("metrics", {"perplexity": {"c4": 3}}))

    # not a manifest at all
    def raw(name: str, expect: str, data) -> None:
        good = json.dumps({**valid, "id": case_id(name)}).encode()
        cases.append((name, expect, data(good) if callable(data) else data))

    raw("json:truncated", "not JSON", lambda g: g[: len(g) // 2])
    raw("json:empty", "not JSON", b"")
    raw("json:list", "JSON object", b"[]")
    raw("json:string", "JSON object", b'"manifest"')
    raw("json:null", "JSON object", b"null")
    raw("json:number", "JSON object", b"42")
    raw("json:not-utf8", "not JSON", b"\xff\xfe\x00{\x00}")
    raw("json:nesting-bomb", "not JSON", b"[" * 200_000 + b"]" * 200_000)
    raw("json:nan", "total_size", lambda g: g.replace(b'"total_size": ', b'"total_size": NaN, "x": ', 1))
    return cases


def tree(root: Path) -> dict[str, int]:
    """Every file and directory under root with its size (directories: -1): what a case may not change."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")}


def cli(*args: str) -> tuple[int, str, str]:
    """The real `quantkit` entry point (quantkit.cli.main), in this process: (exit code, stdout, stderr)."""
    from quantkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved, sys.argv = sys.argv, ["quantkit", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = saved
    return code, out.getvalue(), err.getvalue()


def run_suite(uri: str, base: Path, pushed: str, make_artifact, fake_manifest) -> list[dict]:
    """Publish one valid artifact into the store at uri, add every hostile variant of its manifest, then run
    pull, push (to `pushed`), verify and show (CLI) and Store.materialize (a cached re-measure) on each.
    base: a directory holding everything local (the store if local, destinations); any change under it
    after a refused operation is counted in `written`."""
    from quantkit.store.manifest import BadManifest
    from quantkit.store.store import Store

    st = Store(uri)
    st.publish(make_artifact(base / "art", 1), fake_manifest("h.valid.1"))
    outside = base / "outside"  # where absolute-path cases point
    outside.mkdir()
    cases = hostile_cases(st.raw_manifest("h.valid.1"), outside)
    for name, _, data in cases:
        st.fs.pipe_file(st.manifest_path(case_id(name)), data)  # bypasses publish, as a hostile writer would
    work = base / "work"
    work.mkdir()
    before = tree(base)
    results = []
    for name, expect, _ in cases:
        aid = case_id(name)
        for op, args in {"pull": ("pull", aid, "--to", str(work / "pulled" / "x")),
                         "push": ("push", aid, "--to", pushed), "verify": ("verify", aid),
                         "show": ("show", aid)}.items():
            code, _, err = cli("store", *args, "--store", uri)
            results.append({"case": name, "expect": expect, "op": op, "id": aid, "code": code, "err": err})
        try:
            st.materialize(aid, work / "materialized" / aid)
            code, err = 0, ""
        except BadManifest as e:
            code, err = 2, e.one_line() + "\n"
        results.append({"case": name, "expect": expect, "op": "materialize", "id": aid, "code": code, "err": err})
        now = tree(base)
        written = len(set(now) - set(before)) + sum(now[k] != v for k, v in before.items() if k in now)
        for r in results[-5:]:
            r["written"] = written
        before = now
    return results
