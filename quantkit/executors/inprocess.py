"""The default executor: targets one after another in this process (each reads the model fresh from its files;
`build._build_one` hands each target's memory back before the next one loads)."""
from __future__ import annotations

from typing import Iterator


class InProcessExecutor:
    name = "inprocess"
    in_process = True

    def run(self, ctx, st, plans, wants, console, done: list[dict]) -> Iterator[tuple]:
        from quantkit.build import BuildResult, _build_one

        for plan in plans:
            result = BuildResult(manifests=list(done))
            manifest = _build_one(ctx, st, plan, wants, console, result)
            yield plan, manifest, result.stages
