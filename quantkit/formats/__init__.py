"""Format registry. Every module in this package registers itself with `@register`; third-party packages
add formats through the `quantkit.formats` entry-point group. Nothing here lists formats by name."""
from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from quantkit.formats.base import _REGISTRY, Format, Produced, TargetOptions, register

__all__ = ["Format", "Produced", "TargetOptions", "register", "get_format", "format_names"]
_loaded = False
UNAVAILABLE: dict[str, str] = {}  # module -> why it could not be imported (a missing optional dependency)


def _discover() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_") and mod.name not in ("base", "layouts"):
            try:
                importlib.import_module(f"{__name__}.{mod.name}")
            except ImportError as e:  # one format's missing dependency must not take the others down
                UNAVAILABLE[mod.name] = f"{type(e).__name__}: {e}"
    for ep in entry_points(group="quantkit.formats"):
        ep.load()


def get_format(name: str) -> Format:
    _discover()
    return _REGISTRY[name]


def format_names() -> list[str]:
    _discover()
    return sorted(n for n, f in _REGISTRY.items() if not f.internal)
