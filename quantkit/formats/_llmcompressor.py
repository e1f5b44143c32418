"""Shared driver for the formats made by llm-compressor (fp8, int8, gptq, awq). Each format only builds its
modifier list; this module decides how llm-compressor runs it:

- data-free (one QuantizationModifier, no calibration): llm-compressor's model-free path, which streams the
  checkpoint's safetensors shard by shard and never builds the model (so it works for models bigger than host
  RAM), on the GPU where there is one;
- calibrated: `oneshot` on a model read fresh from the source files (placement by quantkit/placement.py), whose
  sequential pipeline onloads one decoder layer at a time to the GPU; with `gpus > 1`, one process per GPU
  (quantkit/distributed.py).

Mixture-of-experts: transformers keeps experts as fused 3-D parameters, which no quantizer targets. They are
linearized first (llm-compressor's `linearize_moe`: one Linear per expert projection) and oneshot runs with
`moe_calibrate_all_experts` (every expert sees every calibration token; the router still weights the output
by its own top-k), so no expert is left with an empty observer. A forward hook per expert projection counts
what reached it; an expert that saw nothing stops the build.
"""
from __future__ import annotations

import contextlib
import gc
import json
from pathlib import Path

from quantkit.architectures import llmcompressor_ignore, resolve_ignore
from quantkit.errors import UserError
from quantkit.formats._storage_dtype import storage_dtype, write_unquantized_in
from quantkit.util import quiet_llmcompressor

LIBRARIES = ("torch", "transformers", "llmcompressor", "compressed-tensors")


def ignore_for(ctx, explicit: list[str] | None) -> list[str]:
    """The target's ignore list in llm-compressor syntax (None: the architecture table's defaults)."""
    return llmcompressor_ignore(resolve_ignore(explicit, ctx.architecture))


def _count_expert_inputs(model) -> tuple[dict[str, int], list]:
    """Forward pre-hooks on every linearized expert projection: name -> tokens that entered it."""
    import torch
    from llmcompressor.modeling.moe.linearize import get_linearized_moes

    counts: dict[str, int] = {}
    hooks = []
    for moe_name, experts in get_linearized_moes(model):
        for name, mod in experts.named_modules():
            if isinstance(mod, torch.nn.Linear):
                key = f"{moe_name}.{name}"
                counts[key] = 0

                def hook(_m, args, kwargs, key=key):
                    x = args[0] if args else next(iter(kwargs.values()))  # AWQ replays calls as kwargs
                    counts[key] += x.reshape(-1, x.shape[-1]).shape[0]
                hooks.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    return counts, hooks


def expert_coverage(counts: dict[str, int]) -> dict:
    experts = {k.rsplit(".", 1)[0] for k in counts}
    return {"experts": len(experts), "expert_projections": len(counts),
            "min_inputs_per_projection": min(counts.values()), "uncalibrated": sorted(k for k, v in counts.items()
                                                                                       if v == 0)}


def run_oneshot(ctx, modifiers: list, out_dir: Path, *, calibrate: bool) -> tuple[dict, dict]:
    """Quantize the model with `modifiers`, save compressed to out_dir. Returns the quantization_config written
    to config.json (it goes into the manifest as the artifact's own words) and extra manifest info
    (`expert_calibration` for MoE models)."""
    quiet_llmcompressor()
    moe = ctx.architecture.moe
    if not calibrate and not moe and model_free_capable(modifiers):
        run_model_free(ctx, modifiers[0].resolve_quantization_config(), out_dir)
        return _finish(ctx, out_dir), {}
    if calibrate and ctx.placement.gpus > 1 and not moe:
        from quantkit.distributed import run_distributed

        run_distributed(ctx, modifiers, out_dir)
        return _finish(ctx, out_dir), {}
    from llmcompressor import oneshot

    from quantkit.distributed import gptq_hessians_in_float64

    gptq_hessians_in_float64()  # the same Hessians as N ranks would compute (quantkit/distributed.py says why)
    model = ctx.load_model("layerwise")
    ctx.devices["calibration" if calibrate else "quantize"] = ctx.devices.pop("layerwise")
    kwargs = {}
    counts, hooks = {}, []
    if moe:
        from llmcompressor.modeling.moe.linearize import linearize_moe

        linearize_moe(model)
        if calibrate:
            counts, hooks = _count_expert_inputs(model)
    if calibrate:
        kwargs = dict(ctx.oneshot_calibration_kwargs(), moe_calibrate_all_experts=True)
    try:
        with fx_wraps_released():
            oneshot(model=model, recipe=modifiers, tokenizer=ctx.tokenizer, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    coverage = expert_coverage(counts) if counts else None
    if coverage and coverage["uncalibrated"]:
        raise UserError(f"{len(coverage['uncalibrated'])} expert projections saw no calibration tokens "
                        f"(first: {coverage['uncalibrated'][0]})", fix="use more calibration samples")
    model.save_pretrained(out_dir, save_compressed=True)
    ctx.tokenizer.save_pretrained(out_dir)
    release_session()
    del model
    # the modules hold themselves in reference cycles (offload and autowrap forwards bound to their module): without
    # a collection now, this target's weights can outlive it into the next target's load (two copies at once)
    gc.collect()
    return _finish(ctx, out_dir), ({"expert_calibration": coverage} if coverage else {})


@contextlib.contextmanager
def fx_wraps_released():
    """Unregister the torch.fx wraps that llm-compressor's sequential pipeline makes while tracing, on exit.

    Why: the pipeline's `autowrap_forward` (llmcompressor/pipelines/sequential/ast_helpers.py) recompiles each
    traced module's forward in a copy of its defining module's globals with `self` = the module, and that code
    calls `torch.fx.wrap(...)`, which records the globals dict in torch.fx's module-level registry
    `torch.fx._symbolic_trace._wrapped_fns_to_patch` for good (so do the traced subgraphs' generated code). The
    chain `_wrapped_fns_to_patch[(id(ns), "wrapped_0")] -> ns -> ns["self"] -> LlamaModel -> ... -> Linear`
    kept every calibrated target's whole model resident until the process ended (one fp32 copy per target).
    torch has no call to unregister a wrap, so the entries this oneshot added (and only those) are dropped
    once it has finished: its traced graph is not used again, and the next trace registers its own."""
    from torch.fx import _symbolic_trace

    registry = _symbolic_trace._wrapped_fns_to_patch
    before = set(registry)
    try:
        yield
    finally:
        for key in set(registry) - before:
            del registry[key]


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


def run_model_free(ctx, config, out_dir: Path) -> None:
    from llmcompressor import model_free_ptq

    from quantkit.sanity import RANDOM_WEIGHTS_MARKER

    pl = ctx.placement
    device = "cuda:0" if pl.on_gpu else "cpu"
    ignore = list(config.ignore or []) + non_linear_weights(ctx.meta_model)
    # first match wins here, while oneshot prefers exact names over the class: specific groups go first
    groups = dict(sorted(config.config_groups.items(), key=lambda kv: "Linear" in kv[1].targets))
    config = config.model_copy(update={"ignore": ignore, "config_groups": groups})
    ctx.devices["quantize"] = f"llm-compressor model-free (shard by shard, no model built) on {pl.compute}"
    from quantkit.pread import pread_checkpoints, shard_inputs_released

    # one shard's tensors in memory, not also its mapped file; each input freed once quantized
    with pread_checkpoints(), shard_inputs_released():
        model_free_ptq(str(ctx.source.path), str(out_dir), config=config, device=device, max_workers=1)
    for extra in ("quantkit-import.json", "quantkit-dummy.json", RANDOM_WEIGHTS_MARKER):  # the source's
        (out_dir / extra).unlink(missing_ok=True)
    ctx.tokenizer.save_pretrained(out_dir)
