"""Engine registry: each module here registers one engine (transformers, llama.cpp, ...) by name."""
from __future__ import annotations

import importlib
import pkgutil

_ENGINES: dict[str, object] = {}


def register_engine(cls):
    _ENGINES[cls.name] = cls()
    return cls


def get_engine(name: str):
    if name not in _ENGINES:
        for mod in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{mod.name}")
    return _ENGINES[name]
