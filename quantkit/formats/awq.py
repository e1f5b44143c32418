"""AWQ W4A16 (asymmetric, group 128 by default) through llm-compressor's AWQModifier, AutoAWQ's official
successor, saved as compressed-tensors; with `export: [awq]` also the classic AutoAWQ GEMM checkpoint in
`awq-gemm/`, proven bit-exact against the compressed-tensors one.

AWQ grid-searches a scale per input channel on cached activations: by far the slowest calibration on CPU
(about 24 min for SmolLM2-135M at 64 x 512 tokens on 2 cores); `n_grid` and the calibration size set the cost.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

from pydantic import Field

from quantkit.errors import UserError
from quantkit.formats._classic import export_classic
from quantkit.formats._groups import Indivisible, plan_groups
from quantkit.formats._llmcompressor import LIBRARIES, ignore_for, run_oneshot
from quantkit.formats.base import Format, Produced, TargetOptions, register
from quantkit.recipe.schema import MAX_GROUP, Patterns
from quantkit.formats.gptq import label, nominal_bits, weight_scheme


class AWQOptions(TargetOptions):
    format: Literal["awq"] = "awq"
    bits: Literal[4] = 4
    group_size: int = Field(128, ge=1, le=MAX_GROUP)
    duo_scaling: bool | Literal["both"] = True  # scales from activations and weights (AutoAWQ's default)
    # >= 3: llm-compressor 0.14 divides by n_grid - 2 when duo_scaling is on
    n_grid: int = Field(20, ge=3, le=1000, description="grid points per scale search; fewer = faster, coarser")
    ignore: Patterns | None = None  # None: the architecture's defaults (quantkit/architectures.py)
    indivisible: Indivisible = "error"
    export: list[Literal["awq"]] = Field(default_factory=list)


@contextlib.contextmanager
def no_pin_memory_without_accelerator():
    """llm-compressor 0.14's AWQ pins cached activations (llmcompressor/pipelines/cache.py,
    IntermediatesCache.pin_memory, called from AWQModifier._apply_smoothing). Pinning needs an accelerator:
    on a CPU-only host it raises "Cannot access accelerator device when none is available". Pinning only
    speeds host-to-device copies, so skip it there, for the duration of the call only."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


@register
class AWQ(Format):
    name = "awq"
    Options = AWQOptions
    libraries = LIBRARIES
    cost = (5.0, 225.0, 0.0)  # at n_grid 10: each grid point re-runs the cached calibration activations

    def estimate_s(self, opts: AWQOptions, **sizes) -> float:
        return super().estimate_s(opts, **sizes) * opts.n_grid / 10

    def needs_calibration(self, opts: AWQOptions) -> bool:
        return True

    def build_profile(self, opts: AWQOptions) -> tuple[str, str]:
        return "layerwise", "awq"

    def describe(self, opts: AWQOptions) -> str:
        return f"AWQ {label(opts.bits, opts.group_size, symmetric=False)}"

    def nominal_bits(self, opts: AWQOptions) -> float:
        return nominal_bits(opts.bits, opts.group_size, symmetric=False)

    def produce(self, ctx, opts: AWQOptions, out_dir: Path) -> Produced:
        ignore = ignore_for(ctx, opts.ignore)
        plan = plan_groups(ctx.meta_model, opts.group_size, ignore, opts.indivisible, opts.name)
        if opts.export and plan.fallback:  # AWQ GEMM configs are global (unquantized layers can be listed)
            raise UserError(f"export awq: the AWQ GEMM layout has one group size for every layer, but "
                            f"`indivisible: fallback` changes {plan.summary}", where=f"target {opts.name}",
                            fix="use `indivisible: ignore`, a group_size that divides every layer, "
                                "or drop `export: [awq]`")
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        ignore += plan.extra_ignore
        modifiers = [AWQModifier(duo_scaling=opts.duo_scaling, n_grid=opts.n_grid),
                     QuantizationModifier(config_groups=plan.config_groups(weight_scheme(opts.bits, False)),
                                          ignore=ignore)]
        with no_pin_memory_without_accelerator():
            qcfg, extra = run_oneshot(ctx, modifiers, out_dir, calibrate=True)
        info = {"algorithm": "awq", "scheme": label(opts.bits, opts.group_size, False), "bits": opts.bits,
                **plan.info(), "symmetric": False, "duo_scaling": opts.duo_scaling, "n_grid": opts.n_grid,
                "ignore": ignore, "container": "compressed-tensors", "quantization_config": qcfg, **extra}
        if "awq" in opts.export:
            # the table's size should be the compressed-tensors checkpoint's, not it plus the export
            info["entry_bytes"] = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
            info["exports"] = {"awq": export_classic("awq", out_dir, opts.name)}
            info["not_loaded"] = [info["exports"]["awq"]["dir"] + "/"]  # the engine loads the checkpoint
        return Produced(info=info)
