"""Discovery shared by the format and engine registries: every module of the package, then the third-party
entry-point group. A module whose optional dependency is missing, or a broken or clashing plugin, is recorded
in one line and never takes quantkit down; a half-loaded plugin keeps nothing in the registry."""
from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points


class DuplicateName(RuntimeError):
    """A second plugin claims a name already registered (e.g. a plugin named like a built-in)."""


def discover(package: str, path, registry: dict, group: str, unavailable: dict, problems: list, label: str,
             skip: tuple[str, ...] = ()) -> list[str]:
    """Import the package's modules and the group's entry points; returns the new one-line problems."""
    for mod in pkgutil.iter_modules(path):
        if mod.name.startswith("_") or mod.name in skip:
            continue
        try:
            importlib.import_module(f"{package}.{mod.name}")
        except ImportError as e:  # one plugin's missing dependency must not take the others down
            unavailable[mod.name] = f"{type(e).__name__}: {e}"
    new = []
    for ep in entry_points(group=group):
        before = dict(registry)
        try:
            ep.load()
            continue
        except DuplicateName as e:
            why = f"{label} {ep.name} ({ep.value}) was ignored: {e}"
        except Exception as e:  # noqa: BLE001 - any error in third-party import code
            why = f"{label} {ep.name} ({ep.value}) failed to load: {type(e).__name__}: {e}"
        for name in set(registry) - set(before):
            del registry[name]
        unavailable.setdefault(ep.name, why)
        new.append(why)
    problems.extend(new)
    return new
