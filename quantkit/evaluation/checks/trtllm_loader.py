"""Does TensorRT-LLM's PyTorch backend load this ModelOpt unified checkpoint the way it was meant?

TensorRT-LLM cannot be installed here, so this re-states what its loader reads, rule by rule, from its public
source (paths relative to NVIDIA/TensorRT-LLM):

- `tensorrt_llm/_torch/model_config.py` `ModelConfig.from_pretrained` / `_build_modelopt_quant_config`:
  `hf_quant_config.json` wins, else an inline modelopt `config.json` `quantization_config`
  (`load_hf_quant_config` -> `is_modelopt_quant_config`); `QuantAlgo(quant_algo)`, `QuantAlgo(kv_cache_quant_algo)`,
  `group_size`, `exclude_modules`, `has_zero_point`, `pre_quant_scale` are read from it.
- `tensorrt_llm/quantization/modelopt_config.py` `read_modelopt_quant_config`: legacy `{"quantization": {...}}`
  and flat 1.x (`ignore`, `kv_cache_scheme`) shapes; `fp8_pb_wo` alias.
- `tensorrt_llm/quantization/mode.py`: `QuantAlgo` values, `KV_CACHE_QUANT_ALGO_LIST = [FP8, INT8, NVFP4]`.
- `tensorrt_llm/models/modeling_utils.py` `QuantConfig.is_module_excluded_from_quantization`: fnmatch (or `re:`)
  on the module name or any ancestor -- TRT-LLM's names, where q/k/v are one `qkv_proj` and gate/up one
  `gate_up_proj` (`tensorrt_llm/_torch/models/checkpoints/hf/weight_mapper.py` `HfWeightMapper.map_weights`).
- `tensorrt_llm/_torch/modules/linear.py` `get_quant_method` and each `*LinearMethod.create_weights` /
  `load_weights_*`: the tensor names, dtypes and shapes below. Most mismatches there do not raise: `copy_weight`
  casts silently (`src.to(dst.dtype)`), a missing FP8 `weight_scale` stays 1.0, a `pre_quant_scale` on a fused
  q/k/v or gate/up member is never read. That is why this check exists.
"""
from __future__ import annotations

import fnmatch
import json
import re
import struct
from pathlib import Path

from quantkit.errors import UserError
from quantkit.evaluation.checks import Subject, register_check
from quantkit.toolchain.tensorrt_llm import KV_CACHE_QUANT_ALGOS, algo_problem

# Algorithms this check knows the linear layout of (linear.py: FP8QDQLinearMethod, W4A16_AWQ_LinearMethod,
# W4A8_AWQ_LinearMethod, NVFP4LinearMethod).
CHECKED_ALGOS = {"FP8", "W4A16_AWQ", "W4A8_AWQ", "NVFP4"}
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
         "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FLOAT = {"F32", "BF16", "F16"}
DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
QUANT_LEAVES = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale")


def read_headers(path: Path) -> dict[str, dict]:
    """name -> {"dtype", "shape", "file"} from the safetensors headers (what TRT-LLM's
    `_read_safetensors_header` reads), without loading tensors."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, info in header.items():
            if name != "__metadata__":
                out[name] = {"dtype": info["dtype"], "shape": tuple(info["shape"]), "file": f}
    return out


def normalized_quant_config(path: Path) -> tuple[dict | None, str]:
    """TRT-LLM's view of the quantization config (`read_modelopt_quant_config`) and where it came from."""
    f = path / "hf_quant_config.json"
    if f.exists():
        raw, source = json.loads(f.read_text()), "hf_quant_config.json"
    else:
        raw = json.loads((path / "config.json").read_text()).get("quantization_config")
        source = "config.json quantization_config"
        modelopt = isinstance(raw, dict) and (str(raw.get("quant_method", "")).lower().startswith("modelopt")
                                              or (raw.get("producer") or {}).get("name") == "modelopt")
        if not modelopt:
            return None, source
    if "quantization" in raw:
        q = dict(raw["quantization"]) if isinstance(raw["quantization"], dict) else {}
    else:
        q = {k: v for k, v in raw.items() if k not in ("producer", "quant_method", "ignore", "kv_cache_scheme",
                                                       "config_groups")}
        q["exclude_modules"] = raw.get("ignore") or []
        scheme = raw.get("kv_cache_scheme")
        if isinstance(scheme, dict):
            q["kv_cache_quant_algo"] = {("float", 8): "FP8", ("float", 4): "NVFP4",
                                        ("int", 8): "INT8"}.get((scheme.get("type"), scheme.get("num_bits")))
        elif isinstance(scheme, str):
            q["kv_cache_quant_algo"] = scheme.upper()
    if str(q.get("quant_algo", "")).lower() == "fp8_pb_wo":
        q["quant_algo"] = "FP8_BLOCK_SCALES"
    return q, source


def is_excluded(name: str, patterns: list[str]) -> bool:
    """`QuantConfig.is_module_excluded_from_quantization`: the name or any dotted ancestor matches."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        for p in patterns:
            if (re.fullmatch(p[3:], cand) if p.startswith("re:") else fnmatch.fnmatchcase(cand, p)):
                return True
    return False


def expected_shapes(cfg: dict, expert: bool = False) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each LLaMA-style projection, from config.json (an MoE expert's MLP is
    `moe_intermediate_size` wide where the config has one, e.g. Qwen3-MoE)."""
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv = cfg.get("num_key_value_heads") or heads
    inter = (expert and cfg.get("moe_intermediate_size")) or cfg.get("intermediate_size")
    return {"q_proj": (heads * head_dim, hidden), "k_proj": (kv * head_dim, hidden),
            "v_proj": (kv * head_dim, hidden), "o_proj": (hidden, heads * head_dim),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}


def check_checkpoint(path: Path) -> list[str]:
    """Everything in `path` that TensorRT-LLM's PyTorch backend would reject or silently mis-load; [] if none."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    q, source = normalized_quant_config(path)
    if q is None:
        return [f"no hf_quant_config.json and no modelopt {source}: TensorRT-LLM would load it unquantized"]
    problems = []
    algo, kv_algo = q.get("quant_algo"), q.get("kv_cache_quant_algo")
    if (why := algo_problem(algo)) is not None:
        return [f"{source}: {why}"]
    if kv_algo is not None and kv_algo not in KV_CACHE_QUANT_ALGOS:
        problems.append(f"{source}: kv_cache_quant_algo {kv_algo!r} not in KV_CACHE_QUANT_ALGO_LIST "
                        f"{sorted(KV_CACHE_QUANT_ALGOS)} (tensorrt_llm/quantization/mode.py)")
    if algo not in CHECKED_ALGOS:
        return problems + [f"{source}: quant_algo {algo} is valid for TensorRT-LLM but not covered by this check"]
    group = q.get("group_size")
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        if not isinstance(group, int) or group <= 0:
            problems.append(f"{source}: {algo} needs an integer group_size, got {group!r}")
            group = None
        if q.get("has_zero_point"):  # finegrained_mixed_dtype_gemm is called with zeros=None
            problems.append(f"{source}: has_zero_point true, but W4A16/W4A8_AWQ_LinearMethod loads no zeros")
    if algo == "NVFP4":
        group = 16  # NVFP4LinearMethod scaling_vector_size; load_hf_quant_config asserts group_size == 16
        if q.get("group_size", 16) != 16:
            problems.append(f"{source}: NVFP4 group_size must be 16, got {q.get('group_size')}")
    excludes = list(q.get("exclude_modules") or [])

    tensors = read_headers(path)
    shapes, expert_shapes = expected_shapes(cfg), expected_shapes(cfg, expert=True)
    model_dtype = DTYPE_NAMES.get(str(cfg.get("dtype") or cfg.get("torch_dtype")), "BF16")
    if not cfg.get("tie_word_embeddings") and "lm_head.weight" not in tensors:
        problems.append("lm_head.weight missing and tie_word_embeddings is false")
    modules = sorted({n.rsplit(".", 1)[0] for n in tensors if n.rsplit(".", 1)[0].rsplit(".", 1)[-1] in LINEARS})
    if not modules:
        problems.append("no LLaMA-style projection weights (q_proj ... down_proj) found")
    groups: dict[str, list[str]] = {}
    for mod in modules:
        parent, leaf = mod.rsplit(".", 1)
        trt_name = f"{parent}.{FUSED.get(leaf, leaf)}"
        groups.setdefault(trt_name, []).append(mod)
        out_f, in_f = (expert_shapes if ".experts." in mod else shapes)[leaf]
        if is_excluded(mod, excludes) != is_excluded(trt_name, excludes):
            problems.append(f"{mod}: exclude_modules treats it differently from TRT-LLM's fused {trt_name}, "
                            f"which is what TRT-LLM matches (exclude all of q/k/v or gate/up together)")
        if is_excluded(trt_name, excludes):
            problems += _check_unquantized(tensors, mod, (out_f, in_f), trt_name)
        else:
            problems += _check_linear(tensors, mod, algo, group, (out_f, in_f), fused=leaf in FUSED,
                                      model_dtype=model_dtype)
    for trt_name, members in groups.items():
        problems += _check_fused_scalars(tensors, trt_name, members, algo)
    problems += _check_kv_scales(tensors, kv_algo)
    return problems


def _numel(info) -> int:
    n = 1
    for d in info["shape"]:
        n *= d
    return n


def _check_unquantized(tensors, mod, shape, trt_name) -> list[str]:
    w = tensors.get(f"{mod}.weight")
    out = []
    if w is None:
        return [f"{mod}.weight missing"]
    if w["dtype"] not in FLOAT or w["shape"] != shape:  # UnquantizedLinearMethod: (out, in) in model dtype
        out.append(f"{mod}.weight: {trt_name} is excluded (unquantized) so TRT-LLM casts it to the model dtype, "
                   f"but it is {w['dtype']} {list(w['shape'])}; expected a float {list(shape)}")
    out += [f"{mod}.{leaf} present on an excluded module: never read" for leaf in QUANT_LEAVES
            if f"{mod}.{leaf}" in tensors]
    return out


def _check_linear(tensors, mod, algo, group, shape, *, fused, model_dtype) -> list[str]:
    out_f, in_f = shape
    w, ws = tensors.get(f"{mod}.weight"), tensors.get(f"{mod}.weight_scale")
    ws2, inp, pqs = (tensors.get(f"{mod}.{leaf}") for leaf in ("weight_scale_2", "input_scale", "pre_quant_scale"))
    p = []

    def want(info, what, dtypes, shp):
        if info is None:
            p.append(f"{mod}.{what} missing ({algo})")
        elif info["dtype"] not in dtypes or (shp is not None and info["shape"] != shp):
            p.append(f"{mod}.{what}: {info['dtype']} {list(info['shape'])}, {algo} expects "
                     f"{'/'.join(sorted(dtypes))} {list(shp) if shp is not None else ''}".rstrip())

    def scalar(info, what, required=True):
        if info is None:
            if required:
                p.append(f"{mod}.{what} missing ({algo})")
        elif info["dtype"] not in FLOAT or _numel(info) != 1:  # loaders do `[...].reshape([])`
            p.append(f"{mod}.{what}: {info['dtype']} {list(info['shape'])}, expected one float")

    if algo == "FP8":  # FP8QDQLinearMethod
        want(w, "weight", {"F8_E4M3"}, (out_f, in_f))
        scalar(ws, "weight_scale")  # absent -> stays 1.0: silently wrong
        scalar(inp, "input_scale", required=False)  # absent -> dynamic activation scaling
        if pqs is not None:
            p.append(f"{mod}.pre_quant_scale: FP8QDQLinearMethod never reads it")
    elif algo in ("W4A16_AWQ", "W4A8_AWQ"):
        # weight (out/2, in) packed int4 -> `weight.T.to(torch.int8)` -> param (in, out // 2) int8
        want(w, "weight", {"U8", "I8"}, (out_f // 2, in_f))
        if group and in_f % group:
            p.append(f"{mod}: in_features {in_f} not divisible by group_size {group} (create_weights raises)")
        want(ws, "weight_scale", FLOAT, (out_f, in_f // group) if group else None)  # loaded as `.T`
        if algo == "W4A16_AWQ":
            if inp is not None or ws2 is not None:
                p.append(f"{mod}: input_scale/weight_scale_2 present but W4A16_AWQ_LinearMethod never reads them")
        else:
            scalar(ws2, "weight_scale_2")
            scalar(inp, "input_scale")
        if fused and pqs is not None and algo == "W4A16_AWQ":
            p.append(f"{mod}.pre_quant_scale: fused q/k/v and gate/up loaders never read it (it must be folded "
                     f"into the preceding norm)")
        elif not fused:  # load_weights_vanilla reads weights[0]["pre_quant_scale"] unconditionally
            want(pqs, "pre_quant_scale", FLOAT, (in_f,))
            if algo == "W4A8_AWQ" and pqs is not None and pqs["dtype"] != model_dtype:
                p.append(f"{mod}.pre_quant_scale is {pqs['dtype']}, W4A8 asserts the model dtype {model_dtype}")
    elif algo == "NVFP4":  # NVFP4LinearMethod
        want(w, "weight", {"U8"}, (out_f, in_f // 2))
        want(ws, "weight_scale", {"F8_E4M3"}, (out_f, in_f // 16))  # asserts float8_e4m3fn
        scalar(ws2, "weight_scale_2")
        scalar(inp, "input_scale", required=False)
    return p


def _scalar_values(tensors, names):
    from safetensors import safe_open

    vals = {}
    for n in names:
        with safe_open(tensors[n]["file"], "pt") as f:
            vals[n] = float(f.get_tensor(n).float().reshape(-1)[0])
    return vals


def _check_fused_scalars(tensors, trt_name, members, algo) -> list[str]:
    """Rules that span the members of one fused TRT-LLM linear."""
    if len(members) < 2:
        return []
    p = []
    have = [f"{m}.input_scale" in tensors for m in members]
    if algo == "FP8" and any(have) and not all(have):  # tmp_input_scales is torch.empty: unset slots are garbage
        p.append(f"{trt_name}: input_scale on some of {members} but not all")
    if algo in ("W4A8_AWQ", "NVFP4"):  # load_weight_scales asserts equal values across the group
        for leaf in ("input_scale", "weight_scale_2"):
            names = [f"{m}.{leaf}" for m in members if f"{m}.{leaf}" in tensors]
            if len(names) == len(members) and len(set(_scalar_values(tensors, names).values())) > 1:
                p.append(f"{trt_name}: {leaf} differs across {members}; TRT-LLM asserts they are equal")
    return p


def _check_kv_scales(tensors, kv_algo) -> list[str]:
    """FP8 KV: `k_proj.k_scale` and `v_proj.v_scale`, one float each, read together from the qkv weights."""
    k = {n.rsplit(".", 2)[0] for n in tensors if n.endswith(".k_proj.k_scale")}
    v = {n.rsplit(".", 2)[0] for n in tensors if n.endswith(".v_proj.v_scale")}
    if kv_algo is None:
        return ["k_scale/v_scale present but kv_cache_quant_algo is null: never used"] if k or v else []
    p = []
    if not k:
        p.append(f"kv_cache_quant_algo {kv_algo} but no *.k_proj.k_scale / *.v_proj.v_scale tensors")
    if k != v:
        p.append(f"k_scale and v_scale must be loaded together; unmatched in {sorted(k ^ v)[:3]}")
    for n in tensors:
        if n.endswith((".k_scale", ".v_scale")) and (tensors[n]["dtype"] not in FLOAT or _numel(tensors[n]) != 1):
            p.append(f"{n}: {tensors[n]['dtype']} {list(tensors[n]['shape'])}, expected one float")
    return p


@register_check("trtllm-loader")
def loader_check(subject: Subject) -> dict:
    """The export passes TensorRT-LLM's loader rules (above); else the build fails and nothing is published."""
    problems = check_checkpoint(Path(subject.path) / subject.entry)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"export fails TensorRT-LLM's loader check: {problems[0]}{more}")
    return {"status": "passed", "summary": "passed (TensorRT-LLM loader rules)"}


@register_check("trtllm-load")
def trtllm_load(subject: Subject) -> dict:
    """Load with the real TensorRT-LLM where it exists (a GPU host); never claim a load that did not happen."""
    import contextlib
    import importlib.util

    if importlib.util.find_spec("tensorrt_llm") is None:
        return {"status": "not run", "summary": "not run (tensorrt_llm not installed)"}
    try:
        from tensorrt_llm import LLM, SamplingParams

        llm = LLM(model=str(Path(subject.path) / subject.entry))
        text = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8))[0].outputs[0].text
        with contextlib.suppress(Exception):
            llm.shutdown()
    except Exception as e:  # noqa: BLE001 - any failure means the target cannot load the artifact
        raise UserError(f"tensorrt_llm.LLM failed on the export: {type(e).__name__}: {e}") from None
    return {"status": "passed", "generated": text, "summary": f"loaded by tensorrt_llm.LLM; generated {text!r}"}
