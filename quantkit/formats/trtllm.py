"""TensorRT-LLM target: a ModelOpt unified HF checkpoint (`hf_quant_config.json`) that TensorRT-LLM's PyTorch
backend loads with `tensorrt_llm.LLM(model=DIR)` (vLLM / SGLang read it with `quantization="modelopt"`).

TensorRT-LLM removed its engine builder; its PyTorch backend reads HF directories directly. The artifact is made
by the real `nvidia-modelopt` (`mtq.quantize` over the build's calibration set, `export_hf_checkpoint`) and
proven three ways before it is published, by evaluation checks this format declares (quantkit.evaluation.checks):
1. `trtllm-loader`: the directory matches what TRT-LLM's loader reads (it cannot be installed here);
2. `perplexity-agrees`: the "modelopt-dequant" engine decodes the exported tensors and its perplexity must agree
   within 0.5% with ModelOpt's own fake-quantized model on the same windows (so the export, not just the
   quantization, is right). The fake-quant number is taken here, through `ctx.score_in_memory`, because that
   model exists only until the export rewrites its weights;
3. `trtllm-load`: where `tensorrt_llm` is importable, it loads the directory and generates a few tokens.

Export-time resmoothing: for AWQ/SmoothQuant, `export_hf_checkpoint` first averages `pre_quant_scale` across
layers that share an input (q/k/v, gate/up), re-quantizes them and folds the scale into the preceding norm,
because TRT-LLM fuses those layers. That changes the numbers, so the fake-quant perplexity the 0.5% agreement is
asserted against is measured after ModelOpt's own `requantize_resmooth_fused_llm_layers` (the model the export
writes). `score_as_calibrated: true` also scores the model before that step (one more perplexity pass, recorded
as `fake_quant.ppl_as_calibrated`): what the fusion costs in quality.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from quantkit.errors import UserError
from quantkit.formats._storage_dtype import storage_dtype, write_unquantized_in
from quantkit.formats.base import Check, Format, Produced, TargetOptions, register
from quantkit.recipe.schema import MAX_GROUP, Patterns
from quantkit.toolchain.tensorrt_llm import algo_problem

AGREEMENT = 0.005  # reference vs fake-quant perplexity, relative


@dataclass(frozen=True)
class Scheme:
    config: str  # the modelopt.torch.quantization config constant
    quant_algo: str  # what hf_quant_config.json says (TensorRT-LLM QuantAlgo)
    grouped: bool = False  # int4 weights in blocks of group_size along in_features


SCHEMES = {
    "fp8": Scheme("FP8_DEFAULT_CFG", "FP8"),
    "int4_awq": Scheme("INT4_AWQ_CFG", "W4A16_AWQ", grouped=True),
    "w4a8_awq": Scheme("W4A8_AWQ_BETA_CFG", "W4A8_AWQ", grouped=True),
    "int8_sq": Scheme("INT8_SMOOTHQUANT_CFG", "W8A8_SQ_PER_CHANNEL"),
    "nvfp4": Scheme("NVFP4_DEFAULT_CFG", "NVFP4"),
}


class TRTLLMOptions(TargetOptions):
    format: Literal["trtllm"] = "trtllm"
    scheme: Literal["fp8", "int4_awq", "w4a8_awq", "int8_sq", "nvfp4"] = "fp8"
    kv_cache: Literal["fp8"] | None = None
    group_size: int | None = Field(None, gt=0, le=MAX_GROUP)  # int4 schemes; default 128 (must divide every in_features)
    # module-name globs left unquantized; None: the architecture's defaults (quantkit/architectures.py)
    ignore: Patterns | None = None
    # AWQ schemes: ModelOpt's awq_lite tries alpha = 0, step, 2*step, ... 1 per layer (default step 0.1, 11 tries);
    # a coarser step is proportionally cheaper to calibrate
    awq_alpha_step: float | None = Field(None, gt=0, le=1)
    # AWQ/SmoothQuant schemes: also score the fake-quant model before export's resmoothing (one more pass)
    score_as_calibrated: bool = False

    @model_validator(mode="after")
    def _alpha_step_needs_awq(self):
        if self.awq_alpha_step is not None and "awq" not in self.scheme:
            raise ValueError(f"awq_alpha_step applies to the AWQ schemes (int4_awq, w4a8_awq), not {self.scheme}")
        if self.score_as_calibrated and SCHEMES[self.scheme].quant_algo == "FP8":
            raise ValueError("score_as_calibrated applies to the schemes export resmooths (AWQ, SmoothQuant), not fp8")
        return self

    @field_validator("scheme")
    @classmethod
    def _usable(cls, v: str) -> str:
        # refused here, not after minutes of calibration: these schemes can never give a verified artifact
        if (why := scheme_problem(v)) is not None:
            raise ValueError(f"scheme {v!r} is not supported: {why}; supported: {', '.join(SUPPORTED)}")
        return v


def scheme_problem(scheme: str) -> str | None:
    """Why `scheme` cannot give a usable, verified artifact (whatever the host), or None."""
    if (why := algo_problem(SCHEMES[scheme].quant_algo)) is not None:
        return f"TensorRT-LLM's PyTorch backend cannot load {SCHEMES[scheme].quant_algo} ({why})"
    if scheme == "nvfp4":
        return ("quantkit has no reference NVFP4 decoder to verify the export (and ModelOpt's NVFP4 calibration "
                "needs a CUDA GPU)")
    return None


SUPPORTED = [s for s in SCHEMES if scheme_problem(s) is None]


def _group(opts: TRTLLMOptions) -> int | None:
    return (opts.group_size or 128) if SCHEMES[opts.scheme].grouped else None


@register
class TRTLLM(Format):
    name = "trtllm"
    Options = TRTLLMOptions
    libraries = ("torch", "transformers", "nvidia-modelopt")
    cost = (5.0, 10.0, 45.0)  # calibration, then 2-3 verification perplexity passes (see produce)

    def estimate_s(self, opts: TRTLLMOptions, **sizes) -> float:
        tries = round(1 / (opts.awq_alpha_step or 0.1)) + 1  # awq_lite's alpha grid, 11 points by default
        awq_search = 200.0 * sizes["params"] / 1e8 * sizes["calib_tokens"] / 1e4 * tries / 11
        return super().estimate_s(opts, **sizes) + (awq_search if "awq" in opts.scheme else 0.0)

    def needs_calibration(self, opts: TRTLLMOptions) -> bool:
        return True  # every scheme calibrates static scales (FP8 inputs, AWQ search, SmoothQuant)

    def build_profile(self, opts: TRTLLMOptions) -> tuple[str, str]:
        return "whole", "modelopt-" + opts.scheme

    def describe(self, opts: TRTLLMOptions) -> str:
        label = SCHEMES[opts.scheme].quant_algo
        if _group(opts):
            label += f" g{_group(opts)}"
        return label + (" kv-fp8" if opts.kv_cache else "")

    def produce(self, ctx, opts: TRTLLMOptions, out_dir: Path) -> Produced:
        import torch

        scheme = SCHEMES[opts.scheme]
        opts = opts.model_copy(update={"ignore": _ignore_globs(ctx, opts.ignore)})
        _preflight(ctx, opts, scheme)
        mtq, export_hf_checkpoint, resmooth = _import_modelopt()
        info = {"scheme": opts.scheme, "quant_algo": scheme.quant_algo, "group_size": _group(opts),
                "kv_cache": opts.kv_cache, "ignore": opts.ignore, "container": "modelopt-unified-hf",
                "modelopt_config": scheme.config}

        model = ctx.load_model("whole")
        ctx.devices["calibration"] = ctx.devices.pop("whole")
        calib = ctx.calibration.input_ids

        def forward_loop(m):
            with torch.no_grad():
                for row in calib:
                    m(input_ids=row[None].to(m.device))

        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # ModelOpt prints progress; stdout may be --json
            model = mtq.quantize(model, _modelopt_config(mtq, opts), forward_loop)
        info["quantize_s"] = round(time.perf_counter() - t0, 1)

        fake, t0 = {}, time.perf_counter()
        if opts.score_as_calibrated and scheme.quant_algo != "FP8":  # FP8 layers are not resmoothed at export
            with _exporter_fp8_rounding():
                fake["ppl_as_calibrated"] = ctx.score_in_memory(model)["ppl"]
        with contextlib.redirect_stdout(sys.stderr):
            resmooth(model)  # what export_hf_checkpoint does first; idempotent when export repeats it
        with _exporter_fp8_rounding():
            verify = ctx.score_in_memory(model)
        fake.update(ppl=verify["ppl"], wall_s=round(time.perf_counter() - t0, 1))
        info["fake_quant"] = fake
        info["verify_windows"] = {k: verify[k] for k in ("dataset", "protocol", "seq_len", "windows")}

        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(sys.stderr):
                export_hf_checkpoint(model, export_dir=out_dir)
        except NotImplementedError as e:  # e.g. partial int4 blocks
            raise UserError(f"trtllm {opts.scheme}: ModelOpt export failed: {e}") from None
        info["export_s"] = round(time.perf_counter() - t0, 1)
        del model
        ctx.tokenizer.save_pretrained(out_dir)
        # before the loader check and the decoded-export perplexity: what is verified is what is published
        info.update(write_unquantized_in(out_dir, storage_dtype(ctx)))
        info["hf_quant_config"] = json.loads((out_dir / "hf_quant_config.json").read_text())
        checks = [Check("trtllm-loader"),
                  Check("perplexity-agrees", {**verify, "expected_ppl": verify["ppl"], "rel_tol": AGREEMENT,
                                              "reference": "ModelOpt fake-quant"}),
                  Check("trtllm-load")]
        return Produced(entry=".", engine="modelopt-dequant", info=info, checks=checks)


def _preflight(ctx, opts: TRTLLMOptions, scheme: Scheme) -> None:
    """Fail in one line, before any calibration time is spent, when the scheme cannot give a usable artifact."""
    import torch

    if (why := scheme_problem(opts.scheme)) is not None:  # options built in code skip the validator
        raise UserError(f"trtllm scheme {opts.scheme}: {why}", fix=f"use one of {', '.join(SUPPORTED)}")
    group = _group(opts)
    if group:
        bad = [(n, m.in_features) for n, m in ctx.meta_model.named_modules()
               if isinstance(m, torch.nn.Linear) and not _ignored(n, opts.ignore) and m.in_features % group]
        if bad:
            ok = [g for g in (128, 64, 32, 16) if all(m.in_features % g == 0 for m in ctx.meta_model.modules()
                                                      if isinstance(m, torch.nn.Linear))]
            raise UserError(f"trtllm {opts.name}: group_size {group} does not divide in_features {bad[0][1]} of "
                            f"{bad[0][0]} (ModelOpt cannot export partial int4 blocks)",
                            fix=f"set group_size: {ok[0]}" if ok else "set a group_size that divides in_features")


def _ignore_globs(ctx, explicit: list[str] | None) -> list[str]:
    """The recipe's globs, or the architecture table's regexes as the concrete module names they select."""
    from quantkit.architectures import matching_modules

    if explicit is not None:
        return list(explicit)
    return matching_modules(ctx.meta_model, list(ctx.architecture.ignore))


def _ignored(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@contextlib.contextmanager
def _exporter_fp8_rounding():
    """Score ModelOpt's fake-quant model with the arithmetic its exporter writes FP8 with.

    Eager fake-quant (CPU) computes `fp8(x * (448 / amax)) / (448 / amax)`; the exporter writes
    `fp8(w / (amax / 448))` and consumers dequantize `q * scale`. The two differ by one ulp before the cast,
    which flips E4M3 rounding ties: on weights that sit on a coarse grid (the demo model is a dequantized Q4_1
    GGUF) that is 0.2% of the elements and +1% perplexity, so the agreement check would compare the export
    with a quantization nobody writes. Same cast, same saturation, only the scale's direction differs.
    Weights: the exporter divides a bf16 weight by a 0-dim float32 scale, which torch computes in bf16, so the
    quotient is rounded to bf16 before FP8 (on the bf16 demo 4.6 % of one layer's codes differ from a float32
    quotient, -0.64 % ppl); a weight's stored dtype is its `quantkit_stored_dtype` where the scorer has widened it.
    Activations (and K/V) are quantized once from float32, as TensorRT-LLM's kernels and the decoded reference do."""
    import torch
    from modelopt.torch.quantization import tensor_quant

    def fp8_as_exported(x, amax):
        if amax is None:
            return x.to(torch.float8_e4m3fn).to(x.dtype)
        a = amax.to(torch.float32)
        scale = torch.where(a <= 1.0 / (1 << 24), torch.ones_like(a), a) / 448.0
        y = x.to(torch.float32) / scale
        if isinstance(x, torch.nn.Parameter) and scale.dim() == 0:  # a weight, as the exporter divides it
            y = y.to(getattr(x, "quantkit_stored_dtype", x.dtype))
        q = y.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        return (q.to(torch.float32) * scale).to(x.dtype)

    eager = tensor_quant.fp8_eager
    tensor_quant.fp8_eager = fp8_as_exported
    try:
        yield
    finally:
        tensor_quant.fp8_eager = eager


def _import_modelopt():
    try:
        import warnings

        # "transformers X is not tested with this modelopt": known and checked by the agreement test; and
        # ModelOpt prints on import, while stdout may be --json
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            import modelopt.torch.quantization as mtq
            from modelopt.torch.export import export_hf_checkpoint
            from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers
    except ImportError as e:
        raise UserError(f"format trtllm needs nvidia-modelopt ({e})", fix="pip install nvidia-modelopt") from None
    return mtq, export_hf_checkpoint, requantize_resmooth_fused_llm_layers


def _modelopt_config(mtq, opts: TRTLLMOptions) -> dict:
    """The scheme's ModelOpt config with quantkit's options applied (later entries override earlier ones)."""
    cfg = copy.deepcopy(getattr(mtq, SCHEMES[opts.scheme].config))
    entries = cfg["quant_cfg"]
    if group := _group(opts):
        for e in entries:
            if e.get("quantizer_name") == "*weight_quantizer":
                for c in e["cfg"] if isinstance(e["cfg"], list) else [e["cfg"]]:
                    if c.get("block_sizes"):
                        c["block_sizes"][-1] = group
    if opts.awq_alpha_step and isinstance(cfg.get("algorithm"), dict) and "awq" in cfg["algorithm"]["method"]:
        cfg["algorithm"]["alpha_step"] = opts.awq_alpha_step
    if opts.kv_cache == "fp8":
        entries += copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
    entries += [{"quantizer_name": f"{p}.*", "enable": False} for p in opts.ignore]
    return cfg
