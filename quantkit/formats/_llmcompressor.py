"""Shared driver for the formats made by llm-compressor (fp8, int8, gptq, awq): one oneshot call on a private
copy of the build's model, then a compressed-tensors save. Each format only builds its modifier list."""
from __future__ import annotations

import json
from pathlib import Path

from quantkit.formats._storage_dtype import storage_dtype, write_unquantized_in

LIBRARIES = ("torch", "transformers", "llmcompressor", "compressed-tensors")


def run_oneshot(ctx, modifiers: list, out_dir: Path, *, calibrate: bool) -> dict:
    """Quantize a fresh copy of the model with `modifiers`, save compressed to out_dir, return the
    quantization_config written to config.json (it goes into the manifest as the artifact's own words)."""
    from llmcompressor import LoggerConfig, configure_logger, oneshot

    # llm-compressor logs through loguru at INFO (plus a METRIC line per quantized module: thousands for a real
    # model), which buries quantkit's own progress; its LLM_COMPRESSOR_LOG_LEVEL still overrides this.
    configure_logger(LoggerConfig(console_log_level="ERROR"))
    model = ctx.fresh_model()
    kwargs = {}
    if calibrate:
        calib = ctx.calibration
        kwargs = dict(dataset=ctx.calibration_dataset(), num_calibration_samples=calib.input_ids.shape[0],
                      max_seq_length=calib.input_ids.shape[1], shuffle_calibration_samples=False)
    oneshot(model=model, recipe=modifiers, tokenizer=ctx.tokenizer, **kwargs)
    model.save_pretrained(out_dir, save_compressed=True)
    ctx.tokenizer.save_pretrained(out_dir)
    del model
    write_unquantized_in(out_dir, storage_dtype(ctx))  # embeddings, norms, lm_head: the source's dtype
    return json.loads((out_dir / "config.json").read_text()).get("quantization_config", {})
