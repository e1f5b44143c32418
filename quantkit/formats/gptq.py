"""GPTQ weight-only INT4/INT8 through llm-compressor's GPTQModifier, saved as compressed-tensors (vLLM,
SGLang); with `export: [gptq]` also the classic AutoGPTQ v1 checkpoint in `gptq-v1/` (TGI, exllama,
GPTQModel), proven bit-exact against the compressed-tensors one.

`algorithm: rtn` is the data-free round-to-nearest reference with the same scheme (QuantizationModifier).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from quantkit.errors import UserError
from quantkit.formats._classic import export_classic
from quantkit.formats._groups import Indivisible, plan_groups
from quantkit.formats._llmcompressor import LIBRARIES, ignore_for, run_oneshot
from quantkit.formats.base import Format, Produced, TargetOptions, register
from quantkit.recipe.schema import MAX_GROUP, Patterns


class GPTQOptions(TargetOptions):
    format: Literal["gptq"] = "gptq"
    bits: Literal[4, 8] = 4
    group_size: int | None = Field(128, le=MAX_GROUP, description="-1 or null: per-channel")
    act_order: bool = True  # llm-compressor's "weight" ordering: better accuracy, no g_idx, no runtime cost
    symmetric: bool = True
    dampening_frac: float = Field(0.01, gt=0, lt=1)
    algorithm: Literal["gptq", "rtn"] = "gptq"
    ignore: Patterns | None = None  # None: the architecture's defaults (quantkit/architectures.py)
    indivisible: Indivisible = "error"
    export: list[Literal["gptq"]] = Field(default_factory=list)

    @field_validator("group_size")
    @classmethod
    def _per_channel(cls, v: int | None) -> int | None:
        if v == -1:
            return None
        if v is not None and v < 1:
            raise ValueError("group_size must be a positive integer, or -1/null for per-channel")
        return v


def weight_scheme(bits: int, symmetric: bool):
    """(targets, group size) -> a weight-only QuantizationScheme (group, or channel when group size is None)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    def make(targets: list[str], gs: int | None):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                                strategy="group" if gs else "channel", group_size=gs)
        return QuantizationScheme(targets=targets, weights=args)
    return make


def label(bits: int, group_size: int | None, symmetric: bool) -> str:
    return f"W{bits}A16 {'g' + str(group_size) if group_size else 'per-channel'}{'' if symmetric else ' asym'}"


def nominal_bits(bits: int, group_size: int | None, symmetric: bool) -> float:
    """Per weight: the integer, plus a 16-bit scale (and a packed zero point) per group."""
    return bits if group_size is None else bits + (16 + (0 if symmetric else bits)) / group_size


@register
class GPTQ(Format):
    name = "gptq"
    Options = GPTQOptions
    libraries = LIBRARIES
    cost = (5.0, 55.0, 0.0)

    def needs_calibration(self, opts: GPTQOptions) -> bool:
        return opts.algorithm == "gptq"

    def describe(self, opts: GPTQOptions) -> str:
        return f"{opts.algorithm.upper()} {label(opts.bits, opts.group_size, opts.symmetric)}"

    def nominal_bits(self, opts: GPTQOptions) -> float:
        return nominal_bits(opts.bits, opts.group_size, opts.symmetric)

    def build_profile(self, opts: GPTQOptions) -> tuple[str, str]:
        return ("layerwise", "gptq") if opts.algorithm == "gptq" else ("model-free", "rtn")

    def produce(self, ctx, opts: GPTQOptions, out_dir: Path) -> Produced:
        ignore = ignore_for(ctx, opts.ignore)
        plan = plan_groups(ctx.meta_model, opts.group_size, ignore, opts.indivisible, opts.name)
        if opts.export and (plan.fallback or plan.extra_ignore):
            # v1 configs are global: loaders replace every decoder Linear with one QuantLinear shape
            raise UserError(f"export gptq: the GPTQ v1 layout has one group size for every layer, but "
                            f"`indivisible: {opts.indivisible}` changes {plan.summary}", where=f"target {opts.name}",
                            fix="use a group_size that divides every layer, or drop `export: [gptq]`")
        from llmcompressor.modifiers.gptq import GPTQModifier
        from llmcompressor.modifiers.quantization import QuantizationModifier

        groups = plan.config_groups(weight_scheme(opts.bits, opts.symmetric))
        ignore += plan.extra_ignore
        if opts.algorithm == "gptq":
            modifier = GPTQModifier(config_groups=groups, ignore=ignore, dampening_frac=opts.dampening_frac,
                                    actorder="weight" if opts.act_order else None)
        else:
            modifier = QuantizationModifier(config_groups=groups, ignore=ignore)
        qcfg, extra = run_oneshot(ctx, [modifier], out_dir, calibrate=self.needs_calibration(opts))
        info = {"algorithm": opts.algorithm, "scheme": label(opts.bits, opts.group_size, opts.symmetric),
                "bits": opts.bits, **plan.info(), "symmetric": opts.symmetric, "ignore": ignore,
                "container": "compressed-tensors", "quantization_config": qcfg, **extra}
        if opts.algorithm == "gptq":
            info.update(act_order="weight" if opts.act_order else None, dampening_frac=opts.dampening_frac)
        if "gptq" in opts.export:
            # the table's size should be the compressed-tensors checkpoint's, not it plus the export
            info["entry_bytes"] = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
            info["exports"] = {"gptq": export_classic("gptq", out_dir, opts.name, damp_percent=opts.dampening_frac)}
            info["not_loaded"] = [info["exports"]["gptq"]["dir"] + "/"]  # the engine loads the checkpoint
        return Produced(info=info)
