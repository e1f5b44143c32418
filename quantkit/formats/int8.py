"""INT8 through llm-compressor, saved as compressed-tensors (what vLLM and TensorRT-LLM load).

- `w8a8`: per-channel int8 weights and dynamic per-token int8 activations. SmoothQuant (`smoothing_strength`,
  default 0.8) first moves activation outliers into the weights, where 8 bits absorb them.
- `w8a16`: per-channel int8 weights only (nothing to smooth).
Weights are rounded by GPTQ (calibrated) or round-to-nearest (`algorithm: rtn`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from quantkit.formats._llmcompressor import LIBRARIES, ignore_for, run_oneshot
from quantkit.formats.base import Format, Produced, TargetOptions, register
from quantkit.recipe.schema import Patterns

SCHEMES = {"w8a8": "W8A8", "w8a16": "W8A16"}


class INT8Options(TargetOptions):
    format: Literal["int8"] = "int8"
    scheme: Literal["w8a8", "w8a16"] = "w8a8"
    smoothing_strength: float | None = Field(None, ge=0, le=1, description="SmoothQuant alpha; null = none")
    algorithm: Literal["gptq", "rtn"] = "gptq"
    dampening_frac: float = Field(0.01, gt=0, lt=1)
    ignore: Patterns | None = None  # None: the architecture's defaults (quantkit/architectures.py)

    @model_validator(mode="before")
    @classmethod
    def _default_smoothing(cls, data: Any) -> Any:
        # resolved here, so the artifact key and manifest carry the value actually used
        if isinstance(data, dict) and "smoothing_strength" not in data:
            data = {**data, "smoothing_strength": 0.8 if data.get("scheme", "w8a8") == "w8a8" else None}
        return data

    @model_validator(mode="after")
    def _smoothing_needs_activations(self) -> "INT8Options":
        if self.scheme == "w8a16" and self.smoothing_strength is not None:
            raise ValueError("smoothing_strength applies to w8a8 only (w8a16 leaves activations unquantized)")
        return self


def int8_scheme(activations: bool):
    """Per-channel symmetric int8 weights (+ dynamic per-token int8 activations). Spelled out: compressed-tensors'
    W8A16 preset is group-128, not per-channel."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts if activations else None)


@register
class INT8(Format):
    name = "int8"
    Options = INT8Options
    libraries = LIBRARIES
    cost = (5.0, 75.0, 0.0)  # SmoothQuant + GPTQ Hessians over the calibration set

    def needs_calibration(self, opts: INT8Options) -> bool:
        return opts.smoothing_strength is not None or opts.algorithm == "gptq"

    def describe(self, opts: INT8Options) -> str:
        sq = f"SQ{opts.smoothing_strength:g}+" if opts.smoothing_strength is not None else ""
        return f"INT8 {SCHEMES[opts.scheme]} {sq}{opts.algorithm.upper()}"

    def nominal_bits(self, opts: INT8Options) -> float:
        return 8.0  # one scale per output channel adds < 0.1 bit per weight

    def build_profile(self, opts: INT8Options) -> tuple[str, str]:
        if not self.needs_calibration(opts):
            return "model-free", "rtn"
        return "layerwise", ("smoothquant+" if opts.smoothing_strength is not None else "") + opts.algorithm

    def produce(self, ctx, opts: INT8Options, out_dir: Path) -> Produced:
        from llmcompressor.modifiers.gptq import GPTQModifier
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform import SmoothQuantModifier

        scheme = SCHEMES[opts.scheme]
        ignore = ignore_for(ctx, opts.ignore)
        groups = {"group_0": int8_scheme(activations=opts.scheme == "w8a8")}
        modifiers = []
        if opts.smoothing_strength is not None:
            modifiers.append(SmoothQuantModifier(smoothing_strength=opts.smoothing_strength))
        if opts.algorithm == "gptq":
            modifiers.append(GPTQModifier(config_groups=groups, ignore=ignore, dampening_frac=opts.dampening_frac))
        else:
            modifiers.append(QuantizationModifier(config_groups=groups, ignore=ignore))
        qcfg, extra = run_oneshot(ctx, modifiers, out_dir, calibrate=self.needs_calibration(opts))
        weights = next(iter(qcfg.get("config_groups", {}).values()), {}).get("weights") or {}
        info = {"algorithm": ("smoothquant+" if opts.smoothing_strength is not None else "") + opts.algorithm,
                "scheme": scheme, "bits": 8, "group_size": None, "symmetric": weights.get("symmetric"),
                "act_order": weights.get("actorder"), "smoothing_strength": opts.smoothing_strength,
                "ignore": ignore, "container": "compressed-tensors", "quantization_config": qcfg, **extra}
        if opts.algorithm == "gptq":
            info["dampening_frac"] = opts.dampening_frac
        return Produced(info=info)
