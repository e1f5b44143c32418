"""Engine registry: each module here registers one engine (transformers, llama.cpp, ...) by name."""
from __future__ import annotations

import importlib
import pkgutil

_ENGINES: dict[str, object] = {}


def register_engine(cls):
    _ENGINES[cls.name] = cls()
    return cls


def _load_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")


def get_engine(name: str):
    if name not in _ENGINES:
        _load_all()
    return _ENGINES[name]


def speed_engine(name: str):
    """The engine that times an artifact whose own engine is `name`: a registered engine that declares it
    `serves` that engine and is `available()` on this host (torch-compiled on a CUDA host, for HF,
    compressed-tensors and ModelOpt artifacts) before the artifact's own engine; None if neither can time it."""
    _load_all()
    for engine in _ENGINES.values():
        if name in getattr(engine, "serves", ()) and engine.available():
            return engine
    own = get_engine(name)
    return own if hasattr(own, "throughput") else None
