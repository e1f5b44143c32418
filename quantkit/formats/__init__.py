"""Format registry. Every module in this package registers itself with `@register`; third-party packages
add formats through the `quantkit.formats` entry-point group. Nothing here lists formats by name."""
from __future__ import annotations

from quantkit.formats.base import _REGISTRY, Check, Format, Produced, TargetOptions, register
from quantkit.formats.base import reference_format as _reference_format
from quantkit.plugins import discover

__all__ = ["Check", "Format", "Produced", "TargetOptions", "register", "get_format", "format_names",
           "reference_format"]
_loaded = False
UNAVAILABLE: dict[str, str] = {}  # module -> why it could not be imported (a missing optional dependency)
PLUGIN_PROBLEMS: list[str] = []  # one line per third-party plugin that failed to load (shown as warnings)


def _discover() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    discover(__name__, __path__, _REGISTRY, "quantkit.formats", UNAVAILABLE, PLUGIN_PROBLEMS, "plugin",
             skip=("base", "layouts"))


def get_format(name: str) -> Format:
    _discover()
    return _REGISTRY[name]


def reference_format() -> Format:
    _discover()
    return _reference_format()


def format_names() -> list[str]:
    _discover()
    return sorted(n for n, f in _REGISTRY.items() if not f.internal)
