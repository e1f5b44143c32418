"""The unquantized source model as the comparison row. It writes no files: its entry is the source itself."""
from __future__ import annotations

from pathlib import Path

from quantkit.formats.base import Format, Produced, TargetOptions, register


def weight_stats(path: Path) -> dict:
    """Parameter count and bytes of the safetensors weights, read from headers only."""
    from safetensors import safe_open

    params, size = 0, 0
    for f in sorted(path.glob("*.safetensors")):
        size += f.stat().st_size
        with safe_open(f, framework="numpy") as sf:
            for name in sf.keys():
                n = 1
                for d in sf.get_slice(name).get_shape():
                    n *= d
                params += n
    return {"param_count": params, "weight_bytes": size, "bytes_16bit": params * 2}


@register
class Baseline(Format):
    name = "baseline"
    internal = True
    reference = True
    needs_model = False
    libraries = ("torch", "transformers")

    def describe(self, opts: TargetOptions) -> str:
        return "unquantized"

    def produce(self, ctx, opts: TargetOptions, out_dir: Path) -> Produced:
        return Produced(entry=str(ctx.source.path), engine="transformers",
                        info={**weight_stats(ctx.source.path), "dtype": ctx.recipe.model.dtype,
                              "dense_reference": True, "quality_reference": True})
