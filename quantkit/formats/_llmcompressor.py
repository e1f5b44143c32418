"""Shared driver for the formats made by llm-compressor (fp8, int8, gptq, awq). Each format only builds its
modifier list; this module decides how llm-compressor runs it:

- data-free (one QuantizationModifier, no calibration): llm-compressor's model-free path, which streams the
  checkpoint's safetensors shard by shard and never builds the model (so it works for models bigger than host
  RAM), on the GPU where there is one;
- calibrated: `oneshot` on a model read fresh from the source files (placement by quantkit/placement.py), whose
  sequential pipeline onloads one decoder layer at a time to the GPU; with `gpus > 1`, one process per GPU
  (quantkit/distributed.py).
"""
from __future__ import annotations

import json
from pathlib import Path

from quantkit.formats._storage_dtype import storage_dtype, write_unquantized_in
from quantkit.util import quiet_llmcompressor

LIBRARIES = ("torch", "transformers", "llmcompressor", "compressed-tensors")


def run_oneshot(ctx, modifiers: list, out_dir: Path, *, calibrate: bool) -> dict:
    """Quantize the model with `modifiers`, save compressed to out_dir, return the quantization_config written
    to config.json (it goes into the manifest as the artifact's own words)."""
    quiet_llmcompressor()
    if not calibrate and model_free_capable(modifiers):
        return run_model_free(ctx, modifiers[0].resolve_quantization_config(), out_dir)
    if calibrate and ctx.placement.gpus > 1:
        from quantkit.distributed import run_distributed

        run_distributed(ctx, modifiers, out_dir)
        return _finish(ctx, out_dir)
    from llmcompressor import oneshot

    model = ctx.load_model("layerwise")
    kwargs = {}
    if calibrate:
        kwargs = ctx.oneshot_calibration_kwargs()
    ctx.devices["calibration" if calibrate else "quantize"] = ctx.devices.pop("layerwise")
    oneshot(model=model, recipe=modifiers, tokenizer=ctx.tokenizer, **kwargs)
    model.save_pretrained(out_dir, save_compressed=True)
    ctx.tokenizer.save_pretrained(out_dir)
    release_session()
    del model
    write_unquantized_in(out_dir, storage_dtype(ctx))  # embeddings, norms, lm_head: the source's dtype
    return _finish(ctx, out_dir)


def release_session() -> None:
    """llm-compressor's global session keeps the last model until the next oneshot resets it, which comes
    after the next target has loaded its own: reset now, so one target's model is gone before the next's."""
    from llmcompressor.core import active_session

    active_session().reset()


def _finish(ctx, out_dir: Path) -> dict:
    write_unquantized_in(out_dir, storage_dtype(ctx))  # embeddings, norms, lm_head: the source's dtype
    return json.loads((out_dir / "config.json").read_text()).get("quantization_config", {})


def model_free_capable(modifiers: list) -> bool:
    """One weight quantizer whose activations (if any) are dynamic: nothing to observe but the weights."""
    from llmcompressor.modifiers.quantization import QuantizationModifier

    if len(modifiers) != 1 or type(modifiers[0]) is not QuantizationModifier:
        return False
    for scheme in modifiers[0].resolve_quantization_config().config_groups.values():
        acts = [a for a in (scheme.input_activations, scheme.output_activations) if a is not None]
        if scheme.weights is None or any(not a.dynamic for a in acts):
            return False
    return True


def non_linear_weights(meta_model) -> list[str]:
    """Modules with a `weight` that are not Linear (embeddings, norms): the model-free path sees only tensor
    names, so it would quantize an embedding table like a Linear unless told."""
    import torch

    return sorted(name for name, m in meta_model.named_modules()
                  if name and not isinstance(m, torch.nn.Linear) and isinstance(getattr(m, "weight", None),
                                                                                torch.Tensor))


def run_model_free(ctx, config, out_dir: Path) -> dict:
    from llmcompressor import model_free_ptq

    pl = ctx.placement
    device = "cuda:0" if pl.on_gpu else "cpu"
    ignore = list(config.ignore or []) + non_linear_weights(ctx.meta_model)
    # first match wins here, while oneshot prefers exact names over the class: specific groups go first
    groups = dict(sorted(config.config_groups.items(), key=lambda kv: "Linear" in kv[1].targets))
    config = config.model_copy(update={"ignore": ignore, "config_groups": groups})
    ctx.devices["quantize"] = f"llm-compressor model-free (shard by shard, no model built) on {pl.compute}"
    model_free_ptq(str(ctx.source.path), str(out_dir), config=config, device=device, max_workers=1)
    for extra in ("quantkit-import.json", "quantkit-dummy.json"):  # source bookkeeping, not the artifact's
        (out_dir / extra).unlink(missing_ok=True)
    ctx.tokenizer.save_pretrained(out_dir)
    return _finish(ctx, out_dir)
