"""The model store: immutable, content-addressed, published manifest-last.

Layout under the store root (any fsspec URL: a local directory by default, file://, s3://bucket/prefix, ...):
    blobs/sha256/<2 hex>/<sha256>        file contents, stored once whatever artifact refers to them
    manifests/<artifact id>.json         one per artifact; an entry exists exactly when this file does
    evals/<artifact id>/<time>-<what>-<rand>.json
                                         measurements added after publishing (a new protocol, say): append-only,
                                         one write-once record per measurement; the newest of a kind wins
    tmp/                                 local/other back-ends: writes in flight; never read, removed by `gc`
Publishing uploads every blob first and the manifest last, written once (backends.py says how each kind of
filesystem makes that atomic). A build killed at any point leaves at most unreferenced blobs, never a visible
entry. There is no shared index: listing is a listing of manifests/, so concurrent publishers never
read-modify-write anything, and a listed entry is always complete.
Everything read back is checked against manifest.py's schema before it is used, and only writes create the
store (a directory, an S3 bucket): opening one to read it creates nothing.
"""
from __future__ import annotations

import datetime as dt
import json
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import fsspec

from quantkit.errors import UserError
from quantkit.store.backends import Writer, is_local, is_object_store
from quantkit.store.manifest import (EVAL_NAME, HEX64, ID, MANIFEST_SCHEMA, MAX_MANIFEST_BYTES, BadManifest,
                                     EvalRecord, ManifestMissing, check_id, check_manifest, merge, parse_eval,
                                     parse_manifest)
from quantkit.util import sha256_file, sha256_fileobj

THREADS = 4  # blob transfers in parallel: object stores are latency-bound per request


class Store:
    def __init__(self, uri: str, options: dict[str, Any] | None = None):
        """`options` are fsspec storage options (e.g. endpoint_url); ignored for local paths. S3 endpoint,
        region and credentials otherwise come from the usual AWS_* variables (AWS_ENDPOINT_URL, ...)."""
        self.uri = uri
        fs, root = fsspec.core.url_to_fs(uri)
        self.options: dict[str, Any] = {}
        if not is_local(fs):
            # other processes publish concurrently: a cached directory listing would hide their entries
            self.options = {"use_listings_cache": False, **(options or {})}
            fs, root = fsspec.core.url_to_fs(uri, **self.options)
        self.fs, self.root = fs, root.rstrip("/")
        self.writer = Writer(self.fs, self.root)
        self._created = False

    def exists(self) -> bool:
        """Is there a store here at all (the directory; on object stores the bucket)? An empty one counts."""
        if is_object_store(self.fs):
            return self.fs.exists(self.root.split("/", 1)[0])
        return self.fs.isdir(self.root)

    def create(self) -> None:
        """Make the store's root (on S3 the bucket, if missing). Only writes call this, never a read."""
        if self._created:
            return
        try:
            self.fs.makedirs(self.root, exist_ok=True)
        except FileExistsError:
            pass
        self._created = True

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    # -- paths -------------------------------------------------------------------------------------------
    def _p(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def blob_path(self, digest: str) -> str:
        if not HEX64.fullmatch(digest):  # the manifest schema checks this; a path built from it must too
            raise BadManifest(f"{digest[:80]!r} is not a sha256 digest")
        return self._p("blobs", "sha256", digest[:2], digest)

    def manifest_path(self, artifact_id: str) -> str:
        return self._p("manifests", f"{check_id(artifact_id)}.json")

    def evals_dir(self, artifact_id: str) -> str:
        return self._p("evals", check_id(artifact_id))

    # -- writing -----------------------------------------------------------------------------------------
    def has_blob(self, digest: str) -> bool:
        return self.fs.exists(self.blob_path(digest))

    def put_blob(self, local: Path, digest: str, link: bool = False) -> bool:
        """Store local's bytes under digest unless present; True if bytes were written. `link`: see
        Writer.put_blob (local's file is the caller's to give away)."""
        dest = self.blob_path(digest)
        self.create()
        if self.fs.exists(dest):
            self.writer.touch(dest)  # a reused blob counts as fresh for `gc --older-than`
            return False
        self.writer.put_blob(local, dest, link=link)
        return True

    def publish(self, staging: Path | None, manifest: dict, link: bool = False) -> dict:
        """Upload staging's files as blobs, then the manifest (with file list, sizes, hashes) last. `link`: the
        staging directory is the caller's to give away (deleted after this, never written again), so a local
        store on the same filesystem hard-links its files instead of copying them (a build's artifact: no
        second write of gigabytes). A file is hashed through the same inode the blob becomes."""
        self.create()
        paths = sorted(p for p in staging.rglob("*") if p.is_file()) if staging is not None else []

        def upload(f: Path) -> dict:
            digest = sha256_file(f)
            self.put_blob(f, digest, link=link)
            return {"path": f.relative_to(staging).as_posix(), "size": f.stat().st_size, "sha256": digest}

        with ThreadPoolExecutor(THREADS) as pool:
            files = list(pool.map(upload, paths))
        manifest = {**manifest, "schema": MANIFEST_SCHEMA, "files": files,
                    "total_size": sum(f["size"] for f in files)}
        check_manifest(manifest, f"manifest of {manifest.get('id')!r}")  # never publish what readers refuse
        # written once: a concurrent publish of the same id (same key, so the same artifact) may have won
        self.writer.create_bytes(json.dumps(manifest, indent=2, sort_keys=True).encode(),
                                 self.manifest_path(manifest["id"]))
        # a `gc` racing this publish could have dropped a reused blob between our check and the manifest
        # write; put back whatever is missing now that the manifest protects it
        for p, f in zip(paths, files):
            if not self.has_blob(f["sha256"]):
                self.writer.put_blob(p, self.blob_path(f["sha256"]), link=link)
        return self.get(manifest["id"])

    def add_eval(self, artifact_id: str, metric: dict) -> str:
        """Append a measurement: a new write-once record, never an overwrite; `get` shows the newest of each
        kind (per dataset for perplexity), the older ones stay for lineage. Returns the record's name."""
        now = dt.datetime.now(dt.timezone.utc)
        record = {**metric, "recorded_at": now.isoformat(timespec="microseconds")}
        EvalRecord.model_validate(record)
        name = f"{now:%Y%m%dT%H%M%S%fZ}-{record.get('dataset') or record['kind']}-{uuid.uuid4().hex[:8]}.json"
        self.create()
        self.writer.create_bytes(json.dumps(record, indent=2, sort_keys=True).encode(),
                                 f"{self.evals_dir(artifact_id)}/{name}")
        return name

    def remove(self, artifact_id: str) -> None:
        """Delete the entry (its manifest first, then its eval records); its blobs go at `gc`."""
        self.fs.rm_file(self.manifest_path(artifact_id))
        try:
            self.fs.rm(self.evals_dir(artifact_id), recursive=True)
        except FileNotFoundError:
            pass

    # -- reading -----------------------------------------------------------------------------------------
    def has(self, artifact_id: str) -> bool:
        return self.fs.exists(self.manifest_path(artifact_id))

    def _read(self, path: str) -> bytes:
        # bounded: a hostile multi-GB "manifest" is refused by size, not read into memory
        with self.fs.open(path, "rb") as f:
            return f.read(MAX_MANIFEST_BYTES + 1)

    def raw_manifest(self, artifact_id: str) -> dict:
        """The manifest exactly as published (without eval records merged in), checked against the schema."""
        path = self.manifest_path(artifact_id)
        try:
            data = self._read(path)
        except FileNotFoundError:
            raise ManifestMissing(f"no artifact {artifact_id!r} in store {self.uri}",
                                  fix="see `quantkit store list`") from None
        return parse_manifest(data, f"manifest {artifact_id} in {self.uri}", artifact_id)

    def eval_files(self, artifact_id: str) -> list[str]:
        try:
            names = self.fs.ls(self.evals_dir(artifact_id), detail=False)
        except FileNotFoundError:
            return []
        return sorted(p for p in names if EVAL_NAME.fullmatch(p.rsplit("/", 1)[-1]))

    def eval_records(self, artifact_id: str) -> list[tuple[str, dict]]:
        """(path, record) of every measurement added after publishing, oldest first."""
        out = []
        for p in self.eval_files(artifact_id):
            try:
                out.append((p, parse_eval(self._read(p), f"eval record {p} in {self.uri}")))
            except FileNotFoundError:  # removed with its entry meanwhile
                continue
        return sorted(out, key=lambda pr: (str(pr[1].get("recorded_at") or ""), pr[0]))

    def get(self, artifact_id: str) -> dict:
        """The manifest with the newest measurement of each kind merged into `metrics`."""
        manifest = self.raw_manifest(artifact_id)
        merge(manifest.setdefault("metrics", {}), [r for _, r in self.eval_records(artifact_id)])
        return manifest

    def resolve_id(self, prefix: str) -> str:
        ids = self.ids()
        if prefix in ids:
            return prefix
        ids = [m for m in ids if m.startswith(prefix)]
        if len(ids) != 1:
            raise UserError(f"{'no' if not ids else 'several'} artifacts match {prefix!r} in {self.uri}",
                            fix="give more of the id (see `quantkit store list`)")
        return ids[0]

    def ids(self) -> list[str]:
        try:
            names = self.fs.ls(self._p("manifests"), detail=False)
        except FileNotFoundError:
            return []
        # a name that is no id can never be asked for (manifest_path refuses it): not an entry
        return sorted(n[:-5] for n in (p.rsplit("/", 1)[-1] for p in names)
                      if n.endswith(".json") and ID.fullmatch(n[:-5]))

    def list(self) -> Iterator[dict]:
        """Every entry, merged; a manifest that fails the schema stops the listing with one line naming it."""
        for i in self.ids():
            try:
                yield self.get(i)
            except ManifestMissing:  # removed between listing and reading: not an entry any more
                continue

    def materialize(self, artifact_id: str, dest: Path) -> Path:
        """Rebuild the artifact's directory from blobs, checking every hash. The files are written to a
        sibling temporary directory and moved into place only when all are good, so a corrupt or missing blob
        leaves nothing behind (and never touches what was at dest)."""
        manifest = self.get(artifact_id)
        dest = Path(dest)
        part = dest.parent / f".{dest.name[:200]}.partial-{uuid.uuid4().hex[:8]}"  # within 255 bytes
        # defence in depth behind the schema: every file must land inside the directory being filled
        for f in manifest["files"]:
            if not (part / f["path"]).resolve().is_relative_to(part.resolve()):
                raise BadManifest(f"manifest {artifact_id}: {f['path']!r} would be written outside {dest}; "
                                  "refused, nothing written")
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise UserError(f"{dest} exists and is not an empty directory", fix="pull into a new directory")
        dest.parent.mkdir(parents=True, exist_ok=True)

        def fetch(f: dict) -> None:
            out = part / f["path"]
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.fs.get_file(self.blob_path(f["sha256"]), str(out))
            except FileNotFoundError:
                raise UserError(f"store blob for {artifact_id}/{f['path']} is missing ({f['sha256'][:12]})",
                                fix="`quantkit store verify`, then rebuild or push that artifact again") from None
            now = sha256_file(out)
            if now != f["sha256"] or out.stat().st_size != f["size"]:
                raise UserError(f"store blob for {artifact_id}/{f['path']} is corrupt (sha256 {now[:12]}, "
                                f"expected {f['sha256'][:12]}); nothing written to {dest}",
                                fix="`quantkit store verify`, then rebuild or push that artifact again")

        try:
            part.mkdir()
            with ThreadPoolExecutor(THREADS) as pool:
                list(pool.map(fetch, manifest["files"]))
            if dest.exists():
                dest.rmdir()
            part.rename(dest)
        finally:
            shutil.rmtree(part, ignore_errors=True)
        return dest

    def verify(self, artifact_id: str | None = None) -> list[str]:
        """Re-hash every blob the manifest(s) reference; returns problems (empty = all good)."""
        problems = []
        for i in [artifact_id] if artifact_id else self.ids():
            for f in self.raw_manifest(i)["files"]:
                p = self.blob_path(f["sha256"])
                try:
                    with self.fs.open(p, "rb") as fh:
                        now = sha256_fileobj(fh)
                        size = fh.tell()
                except FileNotFoundError:
                    problems.append(f"{i}: {f['path']}: blob missing")
                    continue
                if now != f["sha256"]:
                    problems.append(f"{i}: {f['path']}: sha256 mismatch (stored {f['sha256'][:12]}, "
                                    f"now {now[:12]})")
                elif size != f["size"]:
                    problems.append(f"{i}: {f['path']}: size {size}, manifest says {f['size']}")
            self.eval_records(i)  # each must parse, or verify stops with the one line naming it
        return problems
