"""Engine registry: each module here registers one engine (transformers, llama.cpp, ...) by name with
`@register_engine`; third-party packages add engines through the `quantkit.engines` entry-point group.
Nothing here lists engines by name."""
from __future__ import annotations

import sys

from quantkit.plugins import DuplicateName, discover

_ENGINES: dict[str, object] = {}
UNAVAILABLE: dict[str, str] = {}  # module or entry point -> why it could not be loaded
PLUGIN_PROBLEMS: list[str] = []  # one line per third-party engine plugin that failed to load
_loaded = False


class DuplicateEngine(DuplicateName):
    """A second engine claims a name already registered (e.g. a plugin named like a built-in)."""


def register_engine(cls):
    if cls.name in _ENGINES and type(_ENGINES[cls.name]) is not cls:
        have = type(_ENGINES[cls.name])
        raise DuplicateEngine(f"engine name {cls.name!r} is already registered by {have.__module__}.{have.__name__}; "
                              f"{cls.__module__}.{cls.__name__} must use another name")
    _ENGINES[cls.name] = cls()
    return cls


def _discover() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for why in discover(__name__, __path__, _ENGINES, "quantkit.engines", UNAVAILABLE, PLUGIN_PROBLEMS,
                        "engine plugin"):
        print(f"warning: {why}", file=sys.stderr)


def get_engine(name: str):
    if name not in _ENGINES:
        _discover()
    if name not in _ENGINES:
        why = f" ({UNAVAILABLE[name]})" if name in UNAVAILABLE else ""
        raise KeyError(f"no engine {name!r}{why}; known: {', '.join(sorted(_ENGINES))}")
    return _ENGINES[name]


def engine_names() -> list[str]:
    _discover()
    return sorted(_ENGINES)


def speed_engine(name: str):
    """The engine that times an artifact whose own engine is `name`: a registered engine that declares it
    `serves` that engine and is `available()` on this host (torch-compiled on a CUDA host, for HF,
    compressed-tensors and ModelOpt artifacts) before the artifact's own engine; None if neither can time it."""
    _discover()
    for engine in _ENGINES.values():
        if name in getattr(engine, "serves", ()) and engine.available():
            return engine
    own = get_engine(name)
    return own if hasattr(own, "throughput") else None
