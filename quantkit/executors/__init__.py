"""Where a build's targets run.

    inprocess        (default) one after another in this process, sharing the loaded model
    ray[:ADDRESS]    each target a Ray task (ADDRESS: host:port, ray://host:10001, auto; none: a local cluster,
                     or $RAY_ADDRESS); workers publish their artifacts to the shared store themselves

The driver always resolves the source, plans, builds the calibration set once and evaluates the baseline
(every target's gate compares against it); an executor only runs `build._build_one` for the targets to build.
An executor's `run` yields (plan, published manifest, stage records) as targets finish.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Protocol

from quantkit.errors import UserError

if TYPE_CHECKING:
    from rich.console import Console

    from quantkit.build import Plan
    from quantkit.context import BuildContext
    from quantkit.evaluation.run import Want
    from quantkit.store.store import Store


class Executor(Protocol):
    name: str
    in_process: bool  # True: targets run here, so the driver loads the model once for all of them

    def run(self, ctx: "BuildContext", st: "Store", plans: list["Plan"], wants: list["Want"],
            console: "Console", done: list[dict]) -> Iterator[tuple["Plan", dict, list[dict]]]:
        ...


def get_executor(spec: str | None) -> Executor:
    name, _, address = (spec or "inprocess").strip().partition(":")
    if name == "inprocess" and not address:
        from quantkit.executors.inprocess import InProcessExecutor

        return InProcessExecutor()
    if name == "ray":
        from quantkit.executors.ray_executor import RayExecutor

        return RayExecutor(address or None)
    raise UserError(f"--executor {spec!r}: expected inprocess or ray[:ADDRESS] (e.g. ray, ray:auto, "
                    "ray:ray://head:10001)")
