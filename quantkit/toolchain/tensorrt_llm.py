"""What TensorRT-LLM's PyTorch backend accepts as a quantization algorithm, from its public source.

Shared by the trtllm format (refuse a scheme before spending calibration time on it) and the loader check
(quantkit.evaluation.checks.trtllm_loader), which re-states the rest of TRT-LLM's loader.
"""
from __future__ import annotations

# tensorrt_llm/quantization/mode.py QuantAlgo (newest stored version, plus names model_config.py refers to)
QUANT_ALGOS = {
    "W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W8A16_GPTQ", "W4A16_GPTQ", "W8A8_SQ_PER_CHANNEL",
    "W8A8_SQ_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "W4A8_QSERVE_PER_GROUP", "W4A8_QSERVE_PER_CHANNEL", "FP8",
    "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES", "INT8", "MIXED_PRECISION", "NVFP4", "W4A8_NVFP4_FP8",
    "W4A8_MXFP4_FP8", "W4A8_MXFP4_MXFP8", "W4A16_MXFP4", "MXFP8", "W4A16_NVFP4", "NO_QUANT",
}
KV_CACHE_QUANT_ALGOS = {"FP8", "INT8", "NVFP4"}  # mode.py KV_CACHE_QUANT_ALGO_LIST
# linear.py get_quant_method has no branch for INT8 weights with INT8 activations: it raises
# ValueError('unsupported quant mode') for every dense layer.
REJECTED_ALGOS = {a: "tensorrt_llm/_torch/modules/linear.py get_quant_method has no INT8 SmoothQuant linear "
                     "(raises 'unsupported quant mode')" for a in QUANT_ALGOS if a.startswith("W8A8_SQ")}


def algo_problem(quant_algo: str | None) -> str | None:
    """Why TRT-LLM cannot serve `quant_algo` at all, or None (used before spending time on calibration)."""
    if quant_algo not in QUANT_ALGOS:
        return f"quant_algo {quant_algo!r} is not a TensorRT-LLM QuantAlgo (tensorrt_llm/quantization/mode.py)"
    return REJECTED_ALGOS.get(quant_algo)
