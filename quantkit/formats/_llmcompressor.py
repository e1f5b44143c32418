"""Shared driver for the formats made by llm-compressor (fp8, int8, gptq, awq): one oneshot call on a private
copy of the build's model, then a compressed-tensors save. Each format only builds its modifier list.

Mixture-of-experts: transformers keeps experts as fused 3-D parameters, which no quantizer targets. They are
linearized first (llm-compressor's `linearize_moe`: one Linear per expert projection) and oneshot runs with
`moe_calibrate_all_experts` (every expert sees every calibration token; the router still weights the output
by its own top-k), so no expert is left with an empty observer. A forward hook per expert projection counts
what reached it; an expert that saw nothing stops the build.
"""
from __future__ import annotations

import json
from pathlib import Path

from quantkit.architectures import llmcompressor_ignore, resolve_ignore
from quantkit.errors import UserError
from quantkit.formats._storage_dtype import storage_dtype, write_unquantized_in

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
    """Quantize a fresh copy of the model with `modifiers`, save compressed to out_dir. Returns the
    quantization_config written to config.json (it goes into the manifest as the artifact's own words) and
    extra manifest info (`expert_calibration` for MoE models)."""
    from llmcompressor import LoggerConfig, configure_logger, oneshot

    # llm-compressor logs through loguru at INFO (plus a METRIC line per quantized module: thousands for a real
    # model), which buries quantkit's own progress; its LLM_COMPRESSOR_LOG_LEVEL still overrides this.
    configure_logger(LoggerConfig(console_log_level="ERROR"))
    model = ctx.fresh_model()
    kwargs = {}
    counts, hooks = {}, []
    if ctx.architecture.moe:
        from llmcompressor.modeling.moe.linearize import linearize_moe

        linearize_moe(model)
        if calibrate:
            counts, hooks = _count_expert_inputs(model)
    if calibrate:
        calib = ctx.calibration
        kwargs = dict(dataset=ctx.calibration_dataset(), num_calibration_samples=calib.input_ids.shape[0],
                      max_seq_length=calib.input_ids.shape[1], shuffle_calibration_samples=False,
                      moe_calibrate_all_experts=True)
    try:
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
    del model
    write_unquantized_in(out_dir, storage_dtype(ctx))  # embeddings, norms, lm_head: the source's dtype
    qcfg = json.loads((out_dir / "config.json").read_text()).get("quantization_config", {})
    return qcfg, ({"expert_calibration": coverage} if coverage else {})
