"""Evaluation steps an artifact declares beyond the recipe's measurements (`Produced.checks`): cross-checks
that must pass before it is published (an export against the quantizer's own fake-quant numbers, a consumer's
loader rules) and tool-protocol metrics (llama-perplexity). The orchestrator runs whatever an artifact
declares, by name; each module here registers its steps with `@register_check("name")`.

A step gets a `Subject` (the artifact's files, engine, metrics measured so far and the build context) and the
params the format declared; it returns a JSON record for the manifest's `checks`, or raises UserError (then
nothing is published).
"""
from __future__ import annotations

import importlib
import pkgutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

_CHECKS: dict[str, Callable[..., dict]] = {}
_loaded = False


@dataclass
class Subject:
    ctx: Any  # the BuildContext
    engine: str
    path: Path
    entry: str
    metrics: dict


def register_check(name: str):
    def deco(fn):
        _CHECKS[name] = fn
        return fn
    return deco


def get_check(name: str):
    global _loaded
    if name not in _CHECKS and not _loaded:
        _loaded = True
        for mod in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{mod.name}")
    if name not in _CHECKS:
        raise KeyError(f"no evaluation check {name!r}; known: {', '.join(sorted(_CHECKS))}")
    return _CHECKS[name]


def run_checks(subject: Subject, checks, console) -> dict[str, dict]:
    """Run each declared check in order; a failing one raises (the caller publishes nothing)."""
    out = {}
    for c in checks:
        t0 = time.perf_counter()
        rec = get_check(c.name)(subject, **c.params)
        out[c.name] = {**rec, "wall_s": round(time.perf_counter() - t0, 2)}
        console.print(f"  check {c.name}: {rec.get('summary', 'passed')}", highlight=False)
    return out
