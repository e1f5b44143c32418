"""The "modelopt-dequant" engine: a reference reader of ModelOpt unified HF checkpoints (`hf_quant_config.json`).

Plain transformers does not understand `quant_method: modelopt`: it upcasts the packed weights without their
scales and "loads fine" into garbage. This engine decodes the exported tensors the way the format defines them
(and the way TensorRT-LLM's linear methods use them), builds a plain HF model and scores it with the transformers
engine's code, so a perplexity from it proves the exported bytes, not just the in-memory quantization:

- weights: FP8 `w * weight_scale`; INT8 `w * weight_scale[:, None]`; INT4 (AWQ) two signed nibbles per byte
  along the output dim, `* weight_scale` per input block of `group_size`; W4A8 additionally rounds the dequantized
  weight through FP8 with `weight_scale_2` (TRT-LLM's `W4A8_AWQ_LinearMethod.apply` runs the GEMM in FP8).
- activations: `pre_quant_scale` multiplies the linear's input (TRT-LLM `W4A16_AWQ_LinearMethod.apply`:
  `input * pre_quant_scale`); a static `input_scale` fake-quantizes it (FP8 E4M3, or INT8 for SmoothQuant).
- KV cache: `k_proj.k_scale` / `v_proj.v_scale` fake-quantize keys (after RoPE) and values to FP8, as
  ModelOpt's calibrated `k_bmm_quantizer` / `v_bmm_quantizer` do.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from quantkit import architectures
from quantkit.evaluation.engines import register_engine
from quantkit.evaluation.engines.transformers_engine import Loaded, TransformersEngine
from quantkit.util import cpu_threads

FP8_MAX = 448.0
KV_ATTENTION = "quantkit_fp8_kv"


def fp8_roundtrip(x, scale):
    """Quantize to FP8 E4M3 with a per-tensor scale and back (ModelOpt's fake quant, saturating), in float32
    whatever x's dtype, as TensorRT-LLM's quantize kernels do (a bf16 copy of the scale would move the grid)."""
    import torch

    s = scale.float()
    q = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * s).to(x.dtype)


def int8_roundtrip(x, scale):
    return (x / scale).round().clamp(-128, 127) * scale


def unpack_int4(packed):
    """ModelOpt `pack_int4_in_uint8`: byte [i, c] holds row 2i (low nibble) and row 2i+1 (high), signed."""
    import torch

    b = packed.view(torch.uint8).to(torch.int16)
    low, high = b & 0x0F, (b >> 4) & 0x0F
    low = torch.where(low > 7, low - 16, low)
    high = torch.where(high > 7, high - 16, high)
    return torch.stack([low, high], dim=1).reshape(2 * packed.shape[0], packed.shape[1]).float()


def read_quant_config(path: Path) -> dict:
    """The legacy `quantization` inner dict (flat 1.x configs are folded into it the way TRT-LLM's
    `read_modelopt_quant_config` does)."""
    f = path / "hf_quant_config.json"
    raw = json.loads(f.read_text()) if f.exists() else \
        json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    if "quantization" in raw:
        return dict(raw["quantization"])
    out = {k: v for k, v in raw.items() if k not in ("producer", "quant_method", "ignore", "config_groups")}
    out["exclude_modules"] = raw.get("ignore") or []
    return out


class CheckpointTensors:
    """The checkpoint's tensors by name, each read from its memory-mapped safetensors file when asked for and put
    on `device`: the reference model is filled one tensor at a time, so host memory never holds the checkpoint
    (a 70B export is ~40-140 GB; the whole-dict load held it twice beside the model: 9.5 GB of host for the
    3.85 GB 8B x 4 checkpoint on the H200, run 6)."""

    def __init__(self, path: Path, device="cpu"):
        from safetensors import safe_open

        self.device = device
        self._handles = [safe_open(f, "pt") for f in sorted(path.glob("*.safetensors"))]
        self._where = {k: h for h in self._handles for k in h.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __getitem__(self, name: str):
        return self._where[name].get_tensor(name).to(self.device)

    def keys(self):
        return self._where.keys()


def dequantized(tensors, qcfg: dict, dtype, hooks: dict):
    """Yields (name, dense tensor) for a plain HF model, decoding each weight with its own scales where it lies
    (`tensors[name]`: a dict or CheckpointTensors); fills hooks = {"acts": {module: {pqs, input_scale, kind}},
    "kv": {attention module: {k_scale, v_scale}}} for the input/KV fake-quant hooks."""
    import torch

    algo = qcfg.get("quant_algo")
    group = qcfg.get("group_size")
    acts, kv = hooks.setdefault("acts", {}), hooks.setdefault("kv", {})
    for name in list(tensors.keys()):
        mod, _, leaf = name.rpartition(".")
        if leaf == "weight" and f"{mod}.weight_scale" in tensors:
            t, s = tensors[name], tensors[f"{mod}.weight_scale"].float()
            if t.dtype == torch.float8_e4m3fn:  # FP8: per-tensor (or per-channel) scale
                w = t.float() * (s if s.dim() == 0 else s.reshape(-1, 1))
            elif t.dtype == torch.int8 and algo and algo.startswith("W8A8"):  # INT8 SQ: per output channel
                w = t.float() * s.reshape(-1, 1)
            elif t.dtype in (torch.uint8, torch.int8):  # INT4 packed, block scales (out, in // group)
                w = unpack_int4(t) * s.repeat_interleave(group, dim=1)
                if f"{mod}.weight_scale_2" in tensors:  # W4A8: the FP8 GEMM sees fp8(w / s2) * s2
                    w = fp8_roundtrip(w, tensors[f"{mod}.weight_scale_2"].float())
            else:
                raise ValueError(f"{name}: cannot decode dtype {t.dtype} for quant_algo {algo}")
            int8_input = t.dtype == torch.int8
            del t
            yield name, w.to(dtype)
            act = {}
            if f"{mod}.pre_quant_scale" in tensors:
                act["pqs"] = tensors[f"{mod}.pre_quant_scale"].float()
            if f"{mod}.input_scale" in tensors:
                act["input_scale"] = tensors[f"{mod}.input_scale"].float()
                act["kind"] = "int8" if int8_input else "fp8"
            if act:
                acts[mod] = act
        elif leaf in ("k_scale", "v_scale"):
            kv.setdefault(mod.rpartition(".")[0], {})[leaf] = tensors[name].float()
        elif leaf in ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale", "output_scale"):
            continue
        else:
            t = tensors[name]
            yield name, t.to(dtype) if t.is_floating_point() else t


def _input_hook(kind: str | None):
    """Fake-quantizes a linear's input as the checkpoint defines. The pre-quant and input scales are the
    module's non-persistent buffers (see build_reference_model), so `model.to("cuda")` moves them with the
    weights: a 1-D CPU pre_quant_scale times a CUDA activation fails (the INT4-AWQ check on the H200, run 4)."""
    def hook(module, args):
        x = args[0]
        if hasattr(module, "_quantkit_pqs"):
            x = x * module._quantkit_pqs.to(x.dtype)
        if hasattr(module, "_quantkit_input_scale"):
            s = module._quantkit_input_scale
            x = fp8_roundtrip(x, s) if kind == "fp8" else int8_roundtrip(x, s.to(x.dtype))
        return (x, *args[1:])
    return hook


def _register_fp8_kv_attention():
    """An attention function that fake-quantizes K (post-RoPE) and V with the module's stored scales, then runs
    SDPA; modules without scales pass through unchanged."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def fp8_kv_sdpa(module, query, key, value, attention_mask, **kwargs):
        if hasattr(module, "_quantkit_k_scale"):
            key = fp8_roundtrip(key, module._quantkit_k_scale)
            value = fp8_roundtrip(value, module._quantkit_v_scale)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(KV_ATTENTION, fp8_kv_sdpa)


def build_reference_model(path: Path, dtype, trust_remote_code: bool = False, device="cpu"):
    """A plain HF model holding the decoded weights, with input/KV fake-quant hooks as the checkpoint defines.
    Built directly on `device` and filled tensor by tensor (CheckpointTensors): one copy of the model, there."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    qcfg = read_quant_config(path)
    tensors = CheckpointTensors(path, device)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):  # build the dense architecture, not a quantized one
        del config.quantization_config
    hooks: dict = {}
    if any(k.endswith((".k_scale", ".v_scale")) for k in tensors.keys()):
        _register_fp8_kv_attention()
        config._attn_implementation = KV_ATTENTION
    try:  # the weights are all overwritten below: skip random init (it costs seconds on CPU)
        from transformers.initialization import no_init_weights
    except ImportError:
        no_init_weights = contextlib.nullcontext
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    arch = architectures.for_config(config)
    if any(".experts.0." in k for k in tensors.keys()):
        # ModelOpt exports one Linear per expert (experts.{i}.gate_proj ...), where transformers keeps them fused:
        # llm-compressor's linearized experts hold exactly those names, and the input hooks below need modules
        from llmcompressor.modeling.moe.linearize import linearize_moe

        linearize_moe(model)
    params = model.state_dict(keep_vars=True)
    loaded, unexpected = set(), []
    with torch.no_grad():
        for name, dense in dequantized(tensors, qcfg, dtype, hooks):
            name = architectures.rename_legacy(name, arch)
            if name not in params or params[name].shape != dense.shape:
                unexpected.append(name)
                continue
            params[name].copy_(dense)
            loaded.add(name)
    missing = set(params) - loaded
    tied = {k for k in missing if k == "lm_head.weight" and architectures.tied(config)}
    if missing - tied or unexpected:
        raise ValueError(f"reference load of {path}: missing {sorted(missing - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.tie_weights()
    hooks["acts"] = {architectures.rename_legacy(k + ".", arch)[:-1]: v for k, v in hooks["acts"].items()}
    for mod, act in hooks["acts"].items():
        m = model.get_submodule(mod)
        for key in ("pqs", "input_scale"):
            if key in act:
                m.register_buffer(f"_quantkit_{key}", act[key], persistent=False)
        m.register_forward_pre_hook(_input_hook(act.get("kind")))
    for attn, scales in hooks["kv"].items():
        if set(scales) != {"k_scale", "v_scale"}:
            raise ValueError(f"{attn}: k_scale and v_scale must come together")
        for key, t in scales.items():
            model.get_submodule(attn).register_buffer(f"_quantkit_{key}", t, persistent=False)
    model.eval()
    return model, qcfg


@register_engine
class ModelOptReferenceEngine:
    """Scores a ModelOpt unified checkpoint by decoding it; perplexity is the transformers engine's `nll`.
    No `throughput`: the speed of a dequantized fp32 model says nothing about the artifact's serving speed."""

    name = "modelopt-dequant"

    def __init__(self):
        self._scorer = TransformersEngine()

    def load(self, path: Path, entry: str = ".", dtype: str = "auto", trust_remote_code: bool = False) -> Loaded:
        import torch

        torch.set_num_threads(cpu_threads())
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # decoded weights are exact in fp32; on a GPU bf16 is what a server would run
        torch_dtype = torch.bfloat16 if device == "cuda" and dtype in ("auto", "bfloat16") else torch.float32
        model, qcfg = build_reference_model(Path(path) / entry, torch_dtype, trust_remote_code, device)
        handle = Loaded(model, device, str(torch_dtype).removeprefix("torch."))
        handle.quant_config = qcfg
        return handle

    def nll(self, handle: Loaded, ids, batch_size: int = 1, label: str = "") -> tuple[float, int]:
        return self._scorer.nll(handle, ids, batch_size=batch_size, label=label)

    def describe(self, handle: Loaded) -> dict:
        out = self._scorer.describe(handle)
        out["engine"] = self.name
        out["quant_algo"] = getattr(handle, "quant_config", {}).get("quant_algo")
        return out
