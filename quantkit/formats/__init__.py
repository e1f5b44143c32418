"""Format registry. Every module in this package registers itself with `@register`; third-party packages
add formats through the `quantkit.formats` entry-point group. Nothing here lists formats by name."""
from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from quantkit.formats.base import _REGISTRY, Check, DuplicateFormat, Format, Produced, TargetOptions, register
from quantkit.formats.base import reference_format as _reference_format

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
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_") and mod.name not in ("base", "layouts"):
            try:
                importlib.import_module(f"{__name__}.{mod.name}")
            except ImportError as e:  # one format's missing dependency must not take the others down
                UNAVAILABLE[mod.name] = f"{type(e).__name__}: {e}"
    for ep in entry_points(group="quantkit.formats"):
        _load_plugin(ep)


def _load_plugin(ep) -> None:
    """A broken or clashing third-party plugin is recorded in one line; it never takes quantkit down."""
    before = dict(_REGISTRY)
    try:
        ep.load()
    except DuplicateFormat as e:
        why = f"plugin {ep.name} ({ep.value}) was ignored: {e}"
    except Exception as e:  # any error in third-party import code: ImportError, SyntaxError, RuntimeError ...
        why = f"plugin {ep.name} ({ep.value}) failed to load: {type(e).__name__}: {e}"
    else:
        return
    for name in set(_REGISTRY) - set(before):  # a half-loaded plugin keeps nothing
        del _REGISTRY[name]
    UNAVAILABLE.setdefault(ep.name, why)
    PLUGIN_PROBLEMS.append(why)


def get_format(name: str) -> Format:
    _discover()
    return _REGISTRY[name]


def reference_format() -> Format:
    _discover()
    return _reference_format()


def format_names() -> list[str]:
    _discover()
    return sorted(n for n, f in _REGISTRY.items() if not f.internal)
