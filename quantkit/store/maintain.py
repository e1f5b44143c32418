"""Store upkeep: copy entries between stores (push), collect garbage (gc), filter listings."""
from __future__ import annotations

import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.errors import UserError
from quantkit.store.backends import mtime
from quantkit.store.manifest import BadManifest, ManifestMissing
from quantkit.store.store import Store
from quantkit.util import sha256_file

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def parse_age(text: str) -> float:
    """'90s', '30m', '24h', '7d', '2w' (or plain seconds) -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise UserError(f"--older-than {text!r}: expected a number with a unit s/m/h/d/w, e.g. 24h")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def matches(m: dict, *, model: str | None = None, fmt: str | None = None, recipe: str | None = None) -> bool:
    """Listing filters: model is a substring of the source uri. (Gate verdicts are not in manifests: the CLI
    computes them from a recipe's current gates, quantkit.gates.)"""
    return ((model is None or model in m.get("source", {}).get("uri", ""))
            and (fmt is None or m["target"]["format"] == fmt)
            and (recipe is None or m["recipe"]["name"] == recipe))


# -- push ----------------------------------------------------------------------------------------------------
@dataclass
class PushResult:
    entries: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    blobs_copied: int = 0
    bytes_copied: int = 0
    bytes_deduped: int = 0


def push(src: Store, dst: Store, ids: list[str]) -> PushResult:
    """Copy entries src -> dst the way a publish does: blobs (hash-checked in transit), eval records, then
    the manifest last, written once. An entry already in dst is left as it is. Every manifest and eval record
    is checked before anything is written: a bad one stops the push with one line naming it."""
    out = PushResult()
    todo = []
    for i in ids:
        if dst.has(i):
            out.already.append(i)
        else:
            todo.append((i, src.raw_manifest(i), src.eval_records(i)))  # raises on a bad one
    if todo:
        dst.create()
    with tempfile.TemporaryDirectory(prefix="quantkit-push-") as tmp:
        for i, manifest, records in todo:
            for f in {f["sha256"]: f for f in manifest["files"]}.values():
                if dst.has_blob(f["sha256"]):
                    out.bytes_deduped += f["size"]
                    continue
                local = Path(tmp) / f["sha256"]
                src.fs.get_file(src.blob_path(f["sha256"]), str(local))
                if sha256_file(local) != f["sha256"]:
                    raise UserError(f"{src.uri}: blob for {i}/{f['path']} is corrupt; {i} not pushed",
                                    fix=f"`quantkit store verify {i} --store {src.uri}`")
                if dst.put_blob(local, f["sha256"]):
                    out.blobs_copied += 1
                    out.bytes_copied += f["size"]
                local.unlink()
            for p, record in records:  # same name, written once: a record already there is never replaced
                dst.writer.create_bytes(json.dumps(record, indent=2, sort_keys=True).encode(),
                                        f"{dst.evals_dir(i)}/{p.rsplit('/', 1)[-1]}")
            dst.writer.create_bytes(json.dumps(manifest, indent=2, sort_keys=True).encode(), dst.manifest_path(i))
            out.entries.append(i)
    return out


# -- gc ------------------------------------------------------------------------------------------------------
@dataclass
class GcResult:
    blobs: list[str] = field(default_factory=list)
    blob_bytes: int = 0
    kept_young: int = 0  # unreferenced but younger than the age: possibly a publish in flight
    live_blobs: int = 0
    tmp: list[str] = field(default_factory=list)
    evals: list[str] = field(default_factory=list)
    uploads: list[str] = field(default_factory=list)


def _referenced(st: Store) -> set[str]:
    live = set()
    for i in st.ids():
        try:
            live.update(f["sha256"] for f in st.raw_manifest(i)["files"])
        except ManifestMissing:  # removed meanwhile
            continue
        except BadManifest as e:  # we cannot know what it protects, so stop
            raise UserError(f"{e}; gc stopped, nothing removed", fix=e.fix) from None
    return live


def _find(st: Store, *parts: str) -> dict[str, dict]:
    try:
        return st.fs.find(st._p(*parts), detail=True)
    except FileNotFoundError:
        return {}


def gc(st: Store, older_than_s: float, dry_run: bool = False) -> GcResult:
    """Remove blobs no manifest references, staging leftovers and orphaned eval records, all only when older
    than older_than_s. The age is what protects a publish in flight: its blobs are uploaded before its
    manifest exists, so they are unreferenced but young. Use an age well above the longest publish."""
    cutoff = time.time() - older_than_s
    res = GcResult()

    def old(info: dict) -> bool:
        t = mtime(info)
        return t is not None and t < cutoff  # no timestamp: keep it, never guess

    live = _referenced(st)
    candidates = {}
    for path, info in _find(st, "blobs", "sha256").items():
        digest = path.rsplit("/", 1)[-1]
        if not _HEX64.match(digest) or info.get("type") == "directory":
            continue
        if digest in live:
            res.live_blobs += 1
        elif old(info):
            candidates[path] = info
        else:
            res.kept_young += 1
    # manifests published while we listed blobs may reuse an old unreferenced blob: look again
    live |= _referenced(st)
    for path, info in candidates.items():
        if path.rsplit("/", 1)[-1] in live:
            res.live_blobs += 1
            continue
        res.blobs.append(path)
        res.blob_bytes += int(info.get("size") or 0)
    res.tmp = [p for p, info in _find(st, "tmp").items() if info.get("type") != "directory" and old(info)]
    ids = set(st.ids())
    for path, info in _find(st, "evals").items():
        owner = path[len(st._p("evals")) + 1:].split("/", 1)[0]
        if owner not in ids and old(info):
            res.evals.append(path)
    res.uploads = _stale_uploads(st, cutoff)
    if not dry_run:
        for p in [*res.blobs, *res.tmp, *res.evals]:
            try:
                st.fs.rm_file(p)
            except FileNotFoundError:
                pass
        _abort_uploads(st, res.uploads)
    return res


def _stale_uploads(st: Store, cutoff: float) -> list[str]:
    """S3 multipart uploads begun under this store and never completed (a killed upload of a big blob):
    invisible, but billed. Other back-ends have none."""
    if "s3" not in st.fs.protocol and "s3a" not in st.fs.protocol:
        return []
    bucket, _, prefix = st.root.partition("/")
    resp = st.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
    return [f"{bucket}/{u['Key']}?uploadId={u['UploadId']}" for u in resp.get("Uploads", [])
            if u["Initiated"].timestamp() < cutoff]


def _abort_uploads(st: Store, uploads: list[str]) -> None:
    for u in uploads:
        path, _, upload_id = u.partition("?uploadId=")
        bucket, _, key = path.partition("/")
        st.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
