"""Per-architecture facts every format reads, in one table (instead of rules scattered through format modules).

An entry says, for one family of Hugging Face `model_type`s:
- `ignore`: modules left unquantized by default, as module-name regexes (lm_head; MoE routers/gates, which are
  tiny and whose rounding reorders experts; vision towers and projectors of multimodal checkpoints). Each
  format turns them into its library's syntax (`llmcompressor_ignore`; `matching_modules` for ModelOpt).
- `moe`: experts exist; llm-compressor linearizes them and calibrates every expert (`moe_calibrate_all_experts`).
- `fused`: projections stored fused in the checkpoint (Phi-3's qkv_proj / gate_up_proj): smoothing and GGUF
  tensor names treat them as one matrix.
- `tied_embeddings`: the family's usual setting (the model's own config.json decides; see `tied`).
- `norm_offset`: RMSNorm computes x * (offset + w); Gemma stores w with offset 1 (llama.cpp stores offset + w,
  so a GGUF import must subtract it again).
- `gguf_arch`: llama.cpp's architecture name for the converter's output (None: no converter support).
- `unsupported`: format or engine name -> what is missing, said before any work is done.

Unknown model types get `GENERIC`: lm_head ignored and nothing claimed; formats then run and fail on their own.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

LM_HEAD = r"lm_head"
ROUTERS = r".*\.mlp\.gate"  # Qwen-MoE and Mixtral routers (also `block_sparse_moe.gate` of older checkpoints)
OLD_ROUTERS = r".*\.block_sparse_moe\.gate"
SHARED_EXPERT_GATE = r".*\.shared_expert_gate"
VISION = r"(model\.)?(vision_tower|multi_modal_projector|visual)\..*"


@dataclass(frozen=True)
class Architecture:
    name: str  # human name for tables
    model_types: tuple[str, ...]
    ignore: tuple[str, ...] = (LM_HEAD,)
    moe: bool = False
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    tied_embeddings: bool = False
    norm_offset: float = 0.0
    gguf_arch: str | None = None
    unsupported: dict[str, str] = field(default_factory=dict)
    # checkpoint names some exporters still write (ModelOpt: Mixtral's original layout) -> transformers' names
    # with linearized experts; (regex, replacement) pairs
    legacy_names: tuple[tuple[str, str], ...] = ()


MOE_IGNORE = (LM_HEAD, ROUTERS, OLD_ROUTERS, SHARED_EXPERT_GATE)
# transformers' compressed-tensors loader re-fuses experts on load and only decompresses symmetric packed weights;
# the artifacts are fine for vLLM, but quantkit's reference engine could not score them
_CT_EXPERTS = "transformers' loader cannot re-fuse {what} compressed-tensors experts, so the transformers engine " \
              "cannot score the artifact"
MOE_UNSUPPORTED = {"awq": _CT_EXPERTS.format(what="asymmetric (zero-point)"),
                   "gptq:asym": _CT_EXPERTS.format(what="asymmetric (zero-point)"),
                   "int8:w8a8": _CT_EXPERTS.format(what="int8 W8A8 (int-quantized)")}
GEMMA_IGNORE = (LM_HEAD, VISION)

TABLE: tuple[Architecture, ...] = (
    Architecture("Llama 3", ("llama",), gguf_arch="llama"),
    Architecture("Mistral", ("mistral",), gguf_arch="llama"),
    Architecture("Qwen 2.5", ("qwen2",), gguf_arch="qwen2"),
    Architecture("Qwen 3", ("qwen3",), gguf_arch="qwen3"),
    Architecture("Gemma 2", ("gemma2",), ignore=GEMMA_IGNORE, tied_embeddings=True, norm_offset=1.0,
                 gguf_arch="gemma2"),
    Architecture("Gemma 3", ("gemma3_text", "gemma3"), ignore=GEMMA_IGNORE, tied_embeddings=True,
                 norm_offset=1.0, gguf_arch="gemma3"),
    Architecture("Phi-3/4", ("phi3",), fused={"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                                               "gate_up_proj": ("gate_proj", "up_proj")}, gguf_arch="phi3"),
    Architecture("Qwen3-MoE", ("qwen3_moe",), ignore=MOE_IGNORE, moe=True, gguf_arch="qwen3moe",
                 unsupported=MOE_UNSUPPORTED),
    Architecture("Mixtral", ("mixtral",), ignore=MOE_IGNORE, moe=True, gguf_arch="llama",
                 legacy_names=((r"\.block_sparse_moe\.experts\.(\d+)\.w1\.", r".mlp.experts.\1.gate_proj."),
                               (r"\.block_sparse_moe\.experts\.(\d+)\.w3\.", r".mlp.experts.\1.up_proj."),
                               (r"\.block_sparse_moe\.experts\.(\d+)\.w2\.", r".mlp.experts.\1.down_proj."),
                               (r"\.block_sparse_moe\.gate\.", ".mlp.gate.")),
                 # import-gguf: transformers' GGUF loader would read llama.cpp's `llama` arch with experts as a
                 # dense Llama and drop them; sources/gguf_moe.py writes the Mixtral checkpoint instead
                 unsupported=MOE_UNSUPPORTED),
)
GENERIC = Architecture("unknown", ())
_BY_TYPE = {t: a for a in TABLE for t in a.model_types}


def for_model_type(model_type: str | None) -> Architecture:
    return _BY_TYPE.get(model_type or "", GENERIC)


def read_config(path: Path) -> dict:
    cfg = Path(path) / "config.json"
    return json.loads(cfg.read_text()) if cfg.is_file() else {}


def model_type(config) -> str | None:
    """model_type of a config (dict or transformers config); multimodal wrappers report their text model."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    return get("model_type")


def for_config(config) -> Architecture:
    return for_model_type(model_type(config))


def for_model(model) -> Architecture:
    return for_config(model.config)


def tied(config) -> bool:
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    return bool(get("tie_word_embeddings", for_config(config).tied_embeddings))


def rename_legacy(name: str, arch: Architecture) -> str:
    for pattern, repl in arch.legacy_names:
        name = re.sub(pattern, repl, name)
    return name


def resolve_ignore(explicit: list[str] | None, arch: Architecture) -> list[str]:
    """A target's `ignore`: None means the architecture's defaults; a list given in the recipe replaces them."""
    return list(arch.ignore) if explicit is None else list(explicit)


def _is_regex(p: str) -> bool:
    return any(c in p for c in "\\*+?()[]|^$")


def llmcompressor_ignore(patterns: list[str]) -> list[str]:
    """llm-compressor/compressed-tensors syntax: exact module names, or `re:` + a regex (matched in full)."""
    return [p if p.startswith("re:") or not _is_regex(p) else f"re:{p}$" for p in patterns]


def matching_modules(model, patterns: list[str]) -> list[str]:
    """Names of the model's modules that the table's regexes select (for libraries with other syntaxes)."""
    rx = [re.compile(p.removeprefix("re:")) for p in patterns]
    return [n for n, _ in model.named_modules() if n and any(r.fullmatch(n) for r in rx)]


def unsupported(arch: Architecture, what: str) -> str | None:
    """Why `what` (a format, engine or step name) cannot handle this architecture; None when it can."""
    return arch.unsupported.get(what)


def support_problem(config: dict, what: str) -> str | None:
    """One line for a config that `what` does not support, naming the architecture and what is missing."""
    arch = for_config(config)
    why = unsupported(arch, what)
    return f"{what} does not support {arch.name} (model_type {model_type(config)}): {why}" if why else None


def target_tags(t) -> list[str]:
    """What a target is, for the `unsupported` keys: its format, format:scheme, format:asym."""
    tags = [t.format]
    if getattr(t, "scheme", None):
        tags.append(f"{t.format}:{t.scheme}")
    if getattr(t, "symmetric", True) is False:
        tags.append(f"{t.format}:asym")
    return tags


def target_problems(config: dict, targets) -> list[str]:
    """For `recipe validate` and the build plan: each target whose format cannot take this architecture."""
    out = []
    for t in targets:
        why = next((w for tag in target_tags(t) if (w := support_problem(config, tag))), None)
        if why:
            out.append(f"target {t.name}: {why}")
    return out


def local_config(source: str, base_dir: Path | None = None) -> dict:
    """config.json of a recipe's model.source when it is a local directory (no download, no import)."""
    for p in ([Path(base_dir) / source] if base_dir else []) + [Path(source)]:
        if p.is_dir():
            return read_config(p)
    return {}
