"""`trust_remote_code` and `allow_pickle` with one meaning in every code path.

Remote code is a checkpoint's own Python (an `auto_map` in config.json or tokenizer_config.json) that
transformers' auto classes import and run. quantkit passes the recipe's flag to every `from_pretrained` it
calls, but other code calls them too: llama.cpp's convert_hf_to_gguf.py loads some tokenizers with
`trust_remote_code=True` hard-coded, and transformers asks on stdin (a hang in CI) when the flag is left out.
`refuse_remote_code()` closes all of them at transformers' two choke points, `resolve_trust_remote_code` (the
decision) and `get_class_from_dynamic_module` (the import): while it is active, checkpoints load with
transformers' own classes or not at all. `python -m quantkit.sources.remote_code SCRIPT ARGS` runs a script
(the converter) under it and exits with EXIT_REFUSED and one line when the script needed remote code.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import runpy
import sys
from pathlib import Path

from quantkit.errors import UserError

EXIT_REFUSED = 3
MARKER = "quantkit: remote code refused:"
FIX = "set model.trust_remote_code: true only if you trust that code"
_AUTO_MODULES = ("configuration_auto", "tokenization_auto", "auto_factory", "processing_auto",
                 "feature_extraction_auto", "image_processing_auto", "video_processing_auto")


class RemoteCodeRefused(UserError):
    def __init__(self, message: str):
        super().__init__(message, fix=FIX)


class _ScriptRefused(BaseException):
    """In a third-party script: not an Exception, so its `except Exception` fallbacks cannot swallow it."""


def needs_remote_code(path: Path) -> str | None:
    """Which file of a local checkpoint asks for its own code (config or tokenizer auto_map), or None."""
    for name in ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json"):
        f = Path(path) / name
        if f.is_file():
            try:
                auto_map = json.loads(f.read_text(errors="replace")).get("auto_map")
            except (ValueError, AttributeError):
                continue  # not JSON / not an object: transformers will say so when loading
            if auto_map:
                return f"{name} auto_map"
    return None


def hf_kwargs(trust_remote_code: bool, allow_pickle: bool) -> dict:
    """What every `from_pretrained` of a checkpoint gets: the recipe's remote-code flag, and safetensors only
    unless pickle is allowed (then transformers prefers safetensors and falls back to .bin: allowed, not forced)."""
    return {"trust_remote_code": bool(trust_remote_code), "use_safetensors": None if allow_pickle else True}


@contextlib.contextmanager
def refuse_remote_code(allowed: bool = False, error: type[BaseException] = RemoteCodeRefused):
    """While active (and not `allowed`), transformers cannot import a checkpoint's own code in this process."""
    if allowed:
        yield
        return
    import transformers.dynamic_module_utils as dmu

    modules = [dmu]
    for name in _AUTO_MODULES:
        with contextlib.suppress(ImportError):
            modules.append(importlib.import_module(f"transformers.models.auto.{name}"))
    originals = {"resolve_trust_remote_code": dmu.resolve_trust_remote_code,
                 "get_class_from_dynamic_module": dmu.get_class_from_dynamic_module}

    def resolve(trust_remote_code, model_name, has_local_code, has_remote_code, *args, **kwargs):
        if has_remote_code and not has_local_code:
            raise error(f"{model_name} can only be loaded with its own Python code (auto_map)")
        return False  # transformers' own classes, whatever the caller asked for

    def get_class(class_reference, pretrained_model_name_or_path, *args, **kwargs):
        raise error(f"{pretrained_model_name_or_path} asks to run its own code ({class_reference})")

    patched = {"resolve_trust_remote_code": resolve, "get_class_from_dynamic_module": get_class}
    swapped = []
    for mod in list(modules) + [m for n, m in list(sys.modules.items()) if n.startswith("transformers.")]:
        for name, fn in patched.items():
            if vars(mod).get(name) is originals[name]:  # not getattr: lazy modules would import on it
                setattr(mod, name, fn)
                swapped.append((mod, name))
    try:
        yield
    finally:
        for mod, name in swapped:
            setattr(mod, name, originals[name])


def main(argv: list[str]) -> int:
    """`python -m quantkit.sources.remote_code [--allow] SCRIPT ARGS...`: run SCRIPT as __main__."""
    allowed = bool(argv) and argv[0] == "--allow"
    script, *args = argv[1:] if allowed else argv
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))  # what `python SCRIPT` does
    try:
        with refuse_remote_code(allowed, error=_ScriptRefused):
            runpy.run_path(script, run_name="__main__")
    except _ScriptRefused as e:
        print(f"{MARKER} {e}", file=sys.stderr)
        return EXIT_REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
