"""TensorRT-LLM target: a ModelOpt unified HF checkpoint (`hf_quant_config.json`) that TensorRT-LLM's PyTorch
backend loads with `tensorrt_llm.LLM(model=DIR)` (vLLM / SGLang read it with `quantization="modelopt"`).

TensorRT-LLM removed its engine builder; its PyTorch backend reads HF directories directly. The artifact is made
by the real `nvidia-modelopt` (`mtq.quantize` over the build's calibration set, `export_hf_checkpoint`) and
proven three ways before it is published:
1. `_modelopt_check`: the directory matches what TRT-LLM's loader reads (it cannot be installed here);
2. the "modelopt-dequant" engine decodes the exported tensors and its perplexity must agree within 0.5% with
   ModelOpt's own fake-quantized model on the same windows (so the export, not just the quantization, is right);
3. where `tensorrt_llm` is importable, it loads the directory and generates a few tokens.

Export-time resmoothing: for AWQ/SmoothQuant, `export_hf_checkpoint` first averages `pre_quant_scale` across
layers that share an input (q/k/v, gate/up), re-quantizes them and folds the scale into the preceding norm,
because TRT-LLM fuses those layers. That changes the numbers, so the fake-quant perplexity is measured twice:
as calibrated, and after ModelOpt's own `requantize_resmooth_fused_llm_layers` (the model the export writes).
The 0.5% agreement is asserted against the latter; both are recorded.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import importlib.util
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from quantkit.errors import UserError
from quantkit.formats._modelopt_check import algo_problem, check_checkpoint
from quantkit.formats._storage_dtype import storage_dtype, write_unquantized_in
from quantkit.formats.base import Format, Produced, TargetOptions, register
from quantkit.recipe.schema import MAX_GROUP, Patterns

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

    @model_validator(mode="after")
    def _alpha_step_needs_awq(self):
        if self.awq_alpha_step is not None and "awq" not in self.scheme:
            raise ValueError(f"awq_alpha_step applies to the AWQ schemes (int4_awq, w4a8_awq), not {self.scheme}")
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

        model = ctx.fresh_model()
        calib = ctx.calibration.input_ids

        def forward_loop(m):
            with torch.no_grad():
                for row in calib:
                    m(input_ids=row[None].to(m.device))

        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # ModelOpt prints progress; stdout may be --json
            model = mtq.quantize(model, _modelopt_config(mtq, opts), forward_loop)
        info["quantize_s"] = round(time.perf_counter() - t0, 1)

        windows = _verification_windows(ctx)
        info["verify_windows"] = {k: windows.meta[k] for k in ("dataset", "protocol", "seq_len", "windows")}
        fake, t0 = {}, time.perf_counter()
        if scheme.quant_algo != "FP8":  # FP8 layers are not resmoothed at export: one measurement suffices
            fake["ppl_as_calibrated"] = _fake_quant_ppl(ctx, model, windows)
        with contextlib.redirect_stdout(sys.stderr):
            resmooth(model)  # what export_hf_checkpoint does first; idempotent when export repeats it
        fake["ppl"] = _fake_quant_ppl(ctx, model, windows)
        fake["wall_s"] = round(time.perf_counter() - t0, 1)
        info["fake_quant"] = fake

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

        problems = check_checkpoint(out_dir)
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            raise UserError(f"trtllm {opts.name}: export fails TensorRT-LLM's loader check: {problems[0]}{more}")
        info["loader_check"] = "passed"

        t0 = time.perf_counter()
        info["reference_ppl"] = _reference_ppl(ctx, out_dir, windows)
        info["reference_s"] = round(time.perf_counter() - t0, 1)
        rel = info["reference_ppl"] / fake["ppl"] - 1
        info["reference_vs_fake_quant"] = round(rel, 6)
        if not math.isfinite(rel) or abs(rel) > AGREEMENT:
            raise UserError(f"trtllm {opts.name}: decoded export ppl {info['reference_ppl']:.4f} differs from "
                            f"ModelOpt's fake-quant ppl {fake['ppl']:.4f} by {rel:+.2%} (limit {AGREEMENT:.1%})")
        info["trtllm_load"] = _trtllm_smoke(out_dir, opts)
        return Produced(entry=".", engine="modelopt-dequant", info=info)


def _preflight(ctx, opts: TRTLLMOptions, scheme: Scheme) -> None:
    """Fail in one line, before any calibration time is spent, when the scheme cannot give a usable artifact."""
    import torch

    if (why := scheme_problem(opts.scheme)) is not None:  # options built in code skip the validator
        raise UserError(f"trtllm scheme {opts.scheme}: {why}", fix=f"use one of {', '.join(SUPPORTED)}")
    group = _group(opts)
    if group:
        bad = [(n, m.in_features) for n, m in ctx.base_model.named_modules()
               if isinstance(m, torch.nn.Linear) and not _ignored(n, opts.ignore) and m.in_features % group]
        if bad:
            ok = [g for g in (128, 64, 32, 16) if all(m.in_features % g == 0 for m in ctx.base_model.modules()
                                                      if isinstance(m, torch.nn.Linear))]
            raise UserError(f"trtllm {opts.name}: group_size {group} does not divide in_features {bad[0][1]} of "
                            f"{bad[0][0]} (ModelOpt cannot export partial int4 blocks)",
                            fix=f"set group_size: {ok[0]}" if ok else "set a group_size that divides in_features")


def _ignore_globs(ctx, explicit: list[str] | None) -> list[str]:
    """The recipe's globs, or the architecture table's regexes as the concrete module names they select."""
    from quantkit.architectures import matching_modules

    if explicit is not None:
        return list(explicit)
    return matching_modules(ctx.base_model, list(ctx.architecture.ignore))


def _ignored(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


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


def _verification_windows(ctx):
    """The first perplexity dataset of the recipe, with its settings: the windows the build itself scores."""
    from quantkit.evaluation.perplexity import make_windows

    ppl = ctx.recipe.eval.perplexity
    dataset, seq_len, max_windows = (ppl.datasets[0], ppl.seq_len, ppl.max_windows) if ppl else ("wikitext2", 512, 8)
    return make_windows(dataset, ctx.tokenizer, ctx.tokenizer_fingerprint, seq_len, max_windows)


def _batch_size(ctx) -> int:
    ppl = ctx.recipe.eval.perplexity
    return ppl.batch_size if ppl else 1


def _fake_quant_ppl(ctx, model, windows) -> float:
    import os

    import torch

    from quantkit.evaluation.engines.transformers_engine import Loaded, TransformersEngine
    from quantkit.evaluation.perplexity import perplexity

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    rec = perplexity(TransformersEngine(), Loaded(model, str(model.device), dtype), windows, _batch_size(ctx))
    return round(rec["ppl"], 4)


def _reference_ppl(ctx, out_dir: Path, windows) -> float:
    from quantkit.evaluation.engines import get_engine
    from quantkit.evaluation.perplexity import perplexity

    engine = get_engine("modelopt-dequant")
    handle = engine.load(out_dir, ".", dtype=ctx.recipe.model.dtype,
                         trust_remote_code=ctx.recipe.model.trust_remote_code)
    rec = perplexity(engine, handle, windows, _batch_size(ctx))
    return round(rec["ppl"], 4)


def _trtllm_smoke(out_dir: Path, opts: TRTLLMOptions) -> str:
    """Load with the real TensorRT-LLM where it exists (a GPU host); never claim a load that did not happen."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "not run (tensorrt_llm not installed)"
    try:
        from tensorrt_llm import LLM, SamplingParams

        llm = LLM(model=str(out_dir))
        text = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8))[0].outputs[0].text
        with contextlib.suppress(Exception):
            llm.shutdown()
    except Exception as e:  # noqa: BLE001 - any failure means the target cannot load the artifact
        raise UserError(f"trtllm {opts.name}: tensorrt_llm.LLM failed on the export: "
                        f"{type(e).__name__}: {e}") from None
    return f"loaded by tensorrt_llm.LLM; generated {text!r}"
