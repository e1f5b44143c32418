"""What the store accepts as a manifest or an eval record. Everything read from a store is checked here first.

A store can be shared (one S3 bucket for a whole CI fleet), so its files are input from strangers: a manifest
whose file list says `../../x`, `/etc/x`, `C:\\x` or `a/../../x` must never make `pull`, `push`, `verify` or
a cached re-measure write outside the directory it was asked to fill, and a manifest that does not parse must
be one clear line, not a traceback. pydantic checks the shape; the path rules below are the part no library
states for us (a portable relative POSIX path, one file per name even on case-insensitive disks).
"""
from __future__ import annotations

import json
import re
import unicodedata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from quantkit.errors import UserError

MANIFEST_SCHEMA = "quantkit.manifest/1"
MAX_MANIFEST_BYTES = 64 << 20  # a 100k-file artifact's manifest is ~15 MB; beyond this is not a manifest
MAX_FILES = 100_000
MAX_FILE_BYTES = 1 << 42  # 4 TiB: above any single checkpoint or GGUF file
MAX_PATH_CHARS = 1024
HEX64 = re.compile(r"[0-9a-f]{64}")
# one path component (manifests/<id>.json, evals/<id>/, pulled/<id>): recipe.target.key; never "." or ".."
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,249}")  # + ".json" fits a 255-byte file name
EVAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}\.json")
# Windows-reserved characters and controls: a path with them means something else on some disk or in a log
_BAD_CHARS = re.compile(r'[\x00-\x1f\x7f\\:*?"<>|]')


class BadManifest(UserError):
    """A manifest or eval record in the store that fails the schema: refused, nothing written."""


class ManifestMissing(UserError):
    """No manifest under that id (never published, or removed meanwhile)."""


def check_relative_path(p: str) -> str:
    """A relative POSIX path that stays inside the directory it is joined to, on any OS."""
    if not p or len(p) > MAX_PATH_CHARS:
        raise ValueError(f"path must have 1..{MAX_PATH_CHARS} characters")
    if m := _BAD_CHARS.search(p):
        raise ValueError(f"path {p[:80]!r} contains {m.group()!r} (backslash, drive colon, control or reserved "
                         "characters are refused)")
    if p.startswith(("/", "~")):
        raise ValueError(f"path {p[:80]!r} is absolute")
    parts = p.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"path {p[:80]!r} has an empty, '.' or '..' component")
    if any(len(part.encode()) > 255 for part in parts):
        raise ValueError(f"path {p[:80]!r} has a component longer than 255 bytes")
    return p


def _fold(p: str) -> str:
    # the names two disks could confuse: macOS/Windows compare case-insensitively, macOS normalizes Unicode
    return unicodedata.normalize("NFC", p).casefold()


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    path: str
    size: int = Field(ge=0, le=MAX_FILE_BYTES)
    sha256: str = Field(pattern=rf"^{HEX64.pattern}$")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return check_relative_path(v)


class Named(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str = Field(min_length=1, max_length=200)


class Target(Named):
    format: str = Field(min_length=1, max_length=100)
    scheme: str = Field("", max_length=200)


class Batch(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    prefill_tok_s: float = Field(ge=0)
    decode_tok_s: float = Field(ge=0)


class EvalRecord(BaseModel):
    """A measurement (evaluation/run.py makes them): the fields the report reads, the rest carried along."""
    model_config = ConfigDict(extra="allow", strict=True)
    kind: str = Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")
    key: str = Field(min_length=1, max_length=200)
    recorded_at: str | None = Field(None, max_length=40)
    # perplexity
    dataset: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    ppl: float | None = Field(None, gt=0)
    protocol: str | None = Field(None, max_length=100)
    seq_len: int | None = Field(None, ge=1)
    windows: int | None = Field(None, ge=0)
    # throughput
    engine: str | None = Field(None, max_length=100)
    batches: dict[str, Batch] | None = None

    @model_validator(mode="after")
    def _complete(self) -> "EvalRecord":
        need = {"perplexity": ("dataset", "ppl", "protocol", "seq_len", "windows"),
                "throughput": ("engine", "batches")}.get(self.kind, ())
        if missing := [f for f in need if not getattr(self, f)]:
            raise ValueError(f"a {self.kind} record needs {', '.join(missing)}")
        return self


class Metrics(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    perplexity: dict[str, EvalRecord] = Field(default_factory=dict)
    throughput: EvalRecord | None = None


class Source(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    uri: str = Field(max_length=MAX_PATH_CHARS)
    fingerprint: str = Field(min_length=1, max_length=200)


class Manifest(BaseModel):
    """The fields the store, the CLI and the report rely on; every other field is carried as it is."""
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)
    schema_: Literal[MANIFEST_SCHEMA] = Field(alias="schema")
    id: str = Field(pattern=rf"^{ID.pattern}$")
    files: list[FileEntry] = Field(max_length=MAX_FILES)
    total_size: int = Field(ge=0)
    recipe: Named
    target: Target
    source: Source
    engine: str = Field(min_length=1, max_length=100)
    entry: str = Field(min_length=1, max_length=MAX_PATH_CHARS)
    created_at: str = Field(max_length=40)
    info: dict[str, Any]
    metrics: Metrics = Field(default_factory=Metrics)

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        seen: dict[str, str] = {}
        for f in self.files:
            k = _fold(f.path)
            if k in seen:
                raise ValueError(f"files: {f.path!r} is listed twice (or differs from {seen[k]!r} only in case)")
            seen[k] = f.path
        for k, p in seen.items():  # "a" and "a/b": a file where a directory must be
            parent = k
            while "/" in parent:
                parent = parent.rsplit("/", 1)[0]
                if parent in seen:
                    raise ValueError(f"files: {seen[parent]!r} is a file and also a directory of {p!r}")
        if self.total_size != sum(f.size for f in self.files):
            raise ValueError(f"total_size {self.total_size} is not the sum of the file sizes")
        # the entry is opened inside the materialized directory; only a file-less entry (the baseline, which
        # names its source directory) points elsewhere, and nothing is ever written there
        if self.files and self.entry != ".":
            check_relative_path(self.entry)
        return self


_FIX = "remove it (`quantkit store rm ID`) and publish it again from a trusted build"


def _why(e: Exception) -> str:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
        return f"{loc}: {err['msg']}{more}"
    return str(e)


def _refuse(where: str, what: str, why: str) -> BadManifest:
    return BadManifest(f"{where} is not a valid {what}: {why[:300]}; refused, nothing written", fix=_FIX)


def _load(data: bytes, where: str, what: str) -> dict:
    if len(data) > MAX_MANIFEST_BYTES:
        raise _refuse(where, what, f"{len(data)} bytes (limit {MAX_MANIFEST_BYTES})")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:  # truncated, not UTF-8, nested past the parser's depth
        raise _refuse(where, what, f"not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise _refuse(where, what, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def check_manifest(obj: dict, where: str, artifact_id: str | None = None) -> dict:
    """Validate a manifest (before publishing it, and after reading it); its id must be where it lives."""
    try:
        Manifest.model_validate(obj)
    except (ValidationError, RecursionError) as e:
        raise _refuse(where, "manifest", _why(e)) from None
    if artifact_id is not None and obj["id"] != artifact_id:
        raise _refuse(where, "manifest", f"it claims id {obj['id']!r}; an id must equal its file name")
    return obj


def parse_manifest(data: bytes, where: str, artifact_id: str) -> dict:
    return check_manifest(_load(data, where, "manifest"), where, artifact_id)


def parse_eval(data: bytes, where: str) -> dict:
    obj = _load(data, where, "eval record")
    try:
        EvalRecord.model_validate(obj)
    except (ValidationError, RecursionError) as e:
        raise _refuse(where, "eval record", _why(e)) from None
    return obj


def merge(metrics: dict, records: list[dict]) -> dict:
    """Merge measurement records into a manifest's `metrics`, later records winning: one per dataset for
    perplexity, one per kind otherwise. The one place this rule lives (build and store both use it)."""
    for r in records:
        if r["kind"] == "perplexity":
            metrics.setdefault("perplexity", {})[r["dataset"]] = r
        else:
            metrics[r["kind"]] = r
    return metrics


def check_id(artifact_id: str) -> str:
    if not isinstance(artifact_id, str) or not ID.fullmatch(artifact_id):
        raise BadManifest(f"artifact id {str(artifact_id)[:80]!r} is not a valid id "
                          "(letters, digits and '_.+-', at most 250 characters)")
    return artifact_id
