"""Model sources: a local HF directory, a hub id at a pinned revision, or a GGUF file imported to dense HF.

Each resolves to a local directory plus a fingerprint (sha256 over config.json and the weight files).
Pickle weights (.bin/.pt) and remote code are refused unless the recipe opts in.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import UserError
from quantkit.recipe.schema import ModelSpec
from quantkit.sources.remote_code import needs_remote_code
from quantkit.util import cache_dir, cached_sha256, fingerprint_files

HUB_ID = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"]
PICKLE_FILES = ["*.bin", "*.pt", "*.pth"]  # fetched only with allow_pickle, and only when no safetensors exist
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt")


@dataclass(frozen=True)
class ModelSource:
    uri: str
    kind: str  # local | hub | gguf | dummy
    path: Path
    revision: str | None
    fingerprint: str

    def tokenizer_fingerprint(self) -> str:
        files = [self.path / n for n in TOKENIZER_FILES if (self.path / n).exists()]
        return fingerprint_files(files, self.path)

    def as_dict(self) -> dict:
        d = {"uri": self.uri, "kind": self.kind, "revision": self.revision, "fingerprint": self.fingerprint}
        return {**d, "weights": "dummy"} if self.kind == "dummy" else d

    @property
    def dummy(self) -> bool:
        return self.kind == "dummy"


def _weight_files(path: Path, spec: ModelSpec) -> list[Path]:
    st = sorted(path.glob("*.safetensors"))
    if st:
        return st
    pickles = sorted(p for pattern in PICKLE_FILES for p in path.glob(pattern))
    if pickles and not spec.allow_pickle:
        raise UserError(f"model.source: {path} has only pickle weights ({pickles[0].name}); pickle can run code "
                        "when loaded", fix="convert to safetensors, or set model.allow_pickle: true if you trust it")
    if not pickles:
        raise UserError(f"model.source: no weight files (*.safetensors) in {path}")
    return pickles


def check_local(path: Path, spec: ModelSpec, uri: str, kind: str, revision: str | None = None) -> ModelSource:
    cfg = path / "config.json"
    if not cfg.exists():
        raise UserError(f"model.source: {path} is not a Hugging Face model directory (no config.json)")
    try:
        json.loads(cfg.read_text())
    except (ValueError, OSError) as e:
        raise UserError(f"model.source: {cfg} is not readable JSON ({type(e).__name__})") from None
    if (why := needs_remote_code(path)) and not spec.trust_remote_code:
        raise UserError(f"model.source: {path} needs custom code ({why})",
                        fix="set model.trust_remote_code: true only if you trust that code")
    weights = _weight_files(path, spec)
    return ModelSource(uri=uri, kind=kind, path=path, revision=revision,
                       fingerprint=fingerprint_files([cfg, *weights], path))


def _hub(spec: ModelSpec) -> ModelSource:
    repo = spec.source.removeprefix("hf://")
    if not spec.revision:
        raise UserError(f"model.revision: hub model {repo} needs a pinned revision (a commit sha or tag)",
                        fix="add `revision: <commit sha>` under model:")
    local = Path(_snapshot(repo, spec.revision, HUB_FILES))
    if spec.allow_pickle and not any(local.glob("*.safetensors")):  # allowed, never preferred
        local = Path(_snapshot(repo, spec.revision, HUB_FILES + PICKLE_FILES, require=PICKLE_FILES))
    return check_local(local, spec, uri=f"hf://{repo}", kind="hub", revision=spec.revision)


def _snapshot(repo: str, revision: str, patterns: list[str], require: list[str] | None = None) -> str:
    """The files of repo@revision matching patterns: from the local HF cache when it has them (and a file
    matching `require`), else from the hub."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    kw = dict(repo_id=repo, revision=revision, allow_patterns=patterns)
    try:
        local = snapshot_download(**kw, local_files_only=True)
        if not require or any(next(Path(local).glob(p), None) for p in require):
            return local
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(f"model.source: {repo}@{revision} is not in the Hugging Face cache"
                        f"{' with ' + ', '.join(require) + ' files' if require else ''} and HF_HUB_OFFLINE=1",
                        fix="download it on a connected machine (huggingface-cli download) or unset HF_HUB_OFFLINE")
    try:
        return snapshot_download(**kw)
    except Exception as e:  # network errors come in many types; all mean the same to the user
        raise UserError(f"model.source: cannot fetch {repo}@{revision} from the hub and it is not "
                        f"cached ({type(e).__name__})", fix="check network/HF_TOKEN, or use a local "
                        "directory as model.source") from None


def _gguf(path: Path, spec: ModelSpec) -> ModelSource:
    from quantkit.sources.gguf_import import import_gguf

    digest = cached_sha256(path)
    out = cache_dir("models") / f"gguf-{digest[:16]}"
    if not (out / "config.json").exists():
        import_gguf(path, out)
    src = check_local(out, spec, uri=str(path), kind="gguf")
    return ModelSource(uri=str(path), kind="gguf", path=out, revision=f"sha256:{digest}",
                       fingerprint=src.fingerprint)


def resolve_source(spec: ModelSpec, base_dir: Path | None = None) -> ModelSource:
    """base_dir: relative local paths are taken from here (the recipe's directory), then from the cwd."""
    raw = spec.source
    if raw.startswith("dummy:"):
        from quantkit.sources.dummy import resolve_dummy

        return resolve_dummy(spec, base_dir)
    candidates = ([base_dir / raw] if base_dir and not Path(raw).is_absolute() else []) + [Path(raw)]
    for p in candidates:
        if p.is_file() and p.suffix == ".gguf":
            return _gguf(p.resolve(), spec)
        if p.is_dir():
            return check_local(p.resolve(), spec, uri=str(raw), kind="local")
    if raw.endswith(".gguf") or raw.startswith((".", "/")) or not HUB_ID.match(raw):
        raise UserError(f"model.source: {raw!r} not found (looked in {', '.join(str(c) for c in candidates)})",
                        fix="for the demo model run `make model`; otherwise give a local dir, .gguf or hub id")
    return _hub(spec)
