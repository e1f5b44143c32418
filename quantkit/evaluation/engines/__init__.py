"""Engine registry: each module here registers one engine (transformers, llama.cpp, ...) by name with
`@register_engine`; third-party packages add engines through the `quantkit.engines` entry-point group.
Nothing here lists engines by name."""
from __future__ import annotations

import importlib
import pkgutil
import sys
from importlib.metadata import entry_points

_ENGINES: dict[str, object] = {}
UNAVAILABLE: dict[str, str] = {}  # module or entry point -> why it could not be loaded
PLUGIN_PROBLEMS: list[str] = []  # one line per third-party engine plugin that failed to load
_loaded = False


class DuplicateEngine(RuntimeError):
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
    for mod in pkgutil.iter_modules(__path__):
        if mod.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{__name__}.{mod.name}")
        except ImportError as e:  # one engine's missing dependency must not take the others down
            UNAVAILABLE[mod.name] = f"{type(e).__name__}: {e}"
    for ep in entry_points(group="quantkit.engines"):
        _load_plugin(ep)


def _load_plugin(ep) -> None:
    """As formats' plugins: a broken or clashing engine plugin is one line on stderr; the rest still load."""
    before = dict(_ENGINES)
    try:
        ep.load()
    except DuplicateEngine as e:
        why = f"engine plugin {ep.name} ({ep.value}) was ignored: {e}"
    except Exception as e:  # noqa: BLE001 - any error in third-party import code
        why = f"engine plugin {ep.name} ({ep.value}) failed to load: {type(e).__name__}: {e}"
    else:
        return
    for name in set(_ENGINES) - set(before):  # a half-loaded plugin keeps nothing
        del _ENGINES[name]
    UNAVAILABLE.setdefault(ep.name, why)
    PLUGIN_PROBLEMS.append(why)
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
