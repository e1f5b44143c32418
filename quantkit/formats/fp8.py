"""FP8 W8A8 through llm-compressor, saved as compressed-tensors (what vLLM, SGLang and TensorRT-LLM load).

- `dynamic` = llm-compressor's FP8_DYNAMIC: per-channel FP8 weights, per-token activation scales computed at
  run time. Data-free.
- `static` = llm-compressor's FP8: per-tensor FP8 weights and a per-tensor activation scale calibrated on the
  build's calibration set.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from quantkit.formats._llmcompressor import LIBRARIES, ignore_for, run_oneshot
from quantkit.formats.base import Format, Produced, TargetOptions, register
from quantkit.recipe.schema import Patterns

SCHEMES = {"dynamic": "FP8_DYNAMIC", "static": "FP8"}


class FP8Options(TargetOptions):
    format: Literal["fp8"] = "fp8"
    scheme: Literal["dynamic", "static"] = "dynamic"
    targets: Patterns = Field(default_factory=lambda: ["Linear"], min_length=1)
    ignore: Patterns | None = None  # None: the architecture's defaults (quantkit/architectures.py)


@register
class FP8(Format):
    name = "fp8"
    Options = FP8Options
    libraries = LIBRARIES
    cost = (2.0, 30.0, 0.0)  # static: one calibration pass for activation scales

    def needs_calibration(self, opts: FP8Options) -> bool:
        return opts.scheme == "static"

    def describe(self, opts: FP8Options) -> str:
        return SCHEMES[opts.scheme]

    def nominal_bits(self, opts: FP8Options) -> float:
        return 8.0  # per-channel/per-tensor fp32 scales add < 0.1 bit per weight

    def build_profile(self, opts: FP8Options) -> tuple[str, str]:
        return ("layerwise", "observe") if opts.scheme == "static" else ("model-free", "rtn")

    def produce(self, ctx, opts: FP8Options, out_dir: Path) -> Produced:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        ignore = ignore_for(ctx, opts.ignore)
        modifier = QuantizationModifier(targets=opts.targets, scheme=SCHEMES[opts.scheme], ignore=ignore)
        qcfg, extra = run_oneshot(ctx, [modifier], out_dir, calibrate=self.needs_calibration(opts))
        return Produced(info={"algorithm": "rtn", "scheme": SCHEMES[opts.scheme], "ignore": ignore,
                              "container": "compressed-tensors", "quantization_config": qcfg, **extra})
