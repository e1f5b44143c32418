"""The model store: immutable, content-addressed, published manifest-last.

Layout under the store root (any fsspec URL; a local directory by default):
    blobs/sha256/<2 hex>/<sha256>        file contents, stored once whatever artifact refers to them
    manifests/<artifact id>.json         one per artifact; an entry exists exactly when this file does
    evals/<artifact id>/<key>.json       measurements added after publishing (a new protocol, say)
    tmp/                                 uploads in flight; never read, removed by `gc`
Publishing uploads every blob first and the manifest last, each through a temporary name; on a local disk the
final move is an atomic rename, and on object stores a single PUT is atomic. A build killed at any point
leaves at most unreferenced blobs, never a visible entry. No shared index is read-modified-written.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import uuid
from pathlib import Path
from typing import Iterator

import fsspec

from quantkit.errors import UserError
from quantkit.util import sha256_file, sha256_fileobj

MANIFEST_SCHEMA = "quantkit.manifest/1"


class Store:
    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = fsspec.core.url_to_fs(uri)
        self.root = self.root.rstrip("/")
        self.fs.makedirs(self.root, exist_ok=True)

    # -- paths -------------------------------------------------------------------------------------------
    def _p(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def blob_path(self, digest: str) -> str:
        return self._p("blobs", "sha256", digest[:2], digest)

    def manifest_path(self, artifact_id: str) -> str:
        return self._p("manifests", f"{artifact_id}.json")

    # -- writing -----------------------------------------------------------------------------------------
    def _put_atomic(self, local: Path | None, dest: str, data: bytes | None = None) -> None:
        tmp = self._p("tmp", uuid.uuid4().hex)
        self.fs.makedirs(self._p("tmp"), exist_ok=True)
        if data is not None:
            self.fs.pipe_file(tmp, data)
        else:
            self.fs.put_file(str(local), tmp)
        self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
        self.fs.mv(tmp, dest)

    def publish(self, staging: Path | None, manifest: dict) -> dict:
        """Upload staging's files as blobs, then the manifest (with file list, sizes, hashes) last."""
        files = []
        if staging is not None:
            for f in sorted(p for p in staging.rglob("*") if p.is_file()):
                digest = sha256_file(f)
                files.append({"path": f.relative_to(staging).as_posix(), "size": f.stat().st_size,
                              "sha256": digest})
                if not self.fs.exists(self.blob_path(digest)):
                    self._put_atomic(f, self.blob_path(digest))
        manifest = {**manifest, "schema": MANIFEST_SCHEMA, "files": files,
                    "total_size": sum(f["size"] for f in files)}
        if files and os.environ.get("QUANTKIT_TEST_KILL_POINT") == "before-manifest":  # killed-publish test
            os.kill(os.getpid(), signal.SIGKILL)
        dest = self.manifest_path(manifest["id"])
        if not self.fs.exists(dest):  # a concurrent identical publish may have won; both are the same entry
            self._put_atomic(None, dest, json.dumps(manifest, indent=2, sort_keys=True).encode())
        return self.get(manifest["id"])

    def add_eval(self, artifact_id: str, metric: dict) -> None:
        # perplexity records are per dataset; other kinds (throughput) have one record per artifact
        label = metric.get("dataset") or metric["kind"]
        dest = self._p("evals", artifact_id, f"{metric['key'][:16]}-{label}.json")
        self._put_atomic(None, dest, json.dumps(metric, indent=2, sort_keys=True).encode())

    # -- reading -----------------------------------------------------------------------------------------
    def has(self, artifact_id: str) -> bool:
        return self.fs.exists(self.manifest_path(artifact_id))

    def get(self, artifact_id: str) -> dict:
        try:
            manifest = json.loads(self.fs.cat_file(self.manifest_path(artifact_id)))
        except FileNotFoundError:
            raise UserError(f"no artifact {artifact_id!r} in store {self.uri}",
                            fix="see `quantkit store list`") from None
        extra = self._p("evals", artifact_id)
        if self.fs.exists(extra):
            for p in sorted(self.fs.ls(extra, detail=False)):
                m = json.loads(self.fs.cat_file(p))
                metrics = manifest.setdefault("metrics", {})
                if m.get("kind", "perplexity") == "perplexity":
                    metrics.setdefault("perplexity", {})[m["dataset"]] = m
                else:
                    metrics[m["kind"]] = m
        return manifest

    def resolve_id(self, prefix: str) -> str:
        ids = [m for m in self.ids() if m.startswith(prefix)]
        if len(ids) != 1:
            raise UserError(f"{'no' if not ids else 'several'} artifacts match {prefix!r} in {self.uri}",
                            fix="give more of the id (see `quantkit store list`)")
        return ids[0]

    def ids(self) -> list[str]:
        d = self._p("manifests")
        if not self.fs.exists(d):
            return []
        return sorted(p.rsplit("/", 1)[-1][:-5] for p in self.fs.ls(d, detail=False) if p.endswith(".json"))

    def list(self) -> Iterator[dict]:
        for i in self.ids():
            yield self.get(i)

    def materialize(self, artifact_id: str, dest: Path) -> Path:
        """Rebuild the artifact's directory from blobs (hash-checked), e.g. to evaluate it again."""
        manifest = self.get(artifact_id)
        dest.mkdir(parents=True, exist_ok=True)
        for f in manifest["files"]:
            out = dest / f["path"]
            out.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self.blob_path(f["sha256"]), str(out))
            if sha256_file(out) != f["sha256"]:
                shutil.rmtree(dest, ignore_errors=True)
                raise UserError(f"store blob for {artifact_id}/{f['path']} is corrupt (sha256 mismatch)",
                                fix="`quantkit store verify` and rebuild that target")
        return dest

    def verify(self, artifact_id: str | None = None) -> list[str]:
        """Re-hash every blob the manifest(s) reference; returns problems (empty = all good)."""
        problems = []
        for i in [artifact_id] if artifact_id else self.ids():
            for f in self.get(i)["files"]:
                p = self.blob_path(f["sha256"])
                if not self.fs.exists(p):
                    problems.append(f"{i}: {f['path']}: blob missing")
                    continue
                with self.fs.open(p, "rb") as fh:
                    now = sha256_fileobj(fh)
                if now != f["sha256"]:
                    problems.append(f"{i}: {f['path']}: sha256 mismatch (stored {f['sha256'][:12]}, "
                                    f"now {now[:12]})")
        return problems
