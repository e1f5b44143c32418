"""Memory planner: does an artifact fit a GPU at a batch size and context, and what is the largest batch?

need = weights + KV cache + reserve, against gpus x memory.
- weights: the real artifact bytes when the store has the artifact, else parameters from config.json with
  the format's nominal bits per weight for decoder linears and 16 bits for embeddings / lm_head.
- KV cache: layers x 2 (K and V) x kv_heads x head_dim x bytes per element x batch x context tokens.
- reserve: 10% of GPU memory for activations, CUDA graphs, allocator slack and the runtime. This is what
  vLLM leaves with its default gpu_memory_utilization=0.9; say otherwise with --reserve-pct.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from quantkit.errors import UserError

GPUS_FILE = Path(__file__).parent / "data" / "gpus.yaml"


def gpu_table() -> dict[str, dict]:
    return yaml.safe_load(GPUS_FILE.read_text())


@dataclass(frozen=True)
class ModelShape:
    layers: int
    kv_heads: int
    head_dim: int
    linear_params: int  # decoder-layer linears: what quantization formats quantize
    other_params: int  # embeddings, lm_head, norms: kept at 16 bits

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params


def shape_from_config(cfg: dict) -> ModelShape:
    cfg = cfg.get("text_config", cfg)
    h, layers, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim") or h // heads
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    mlp = 3 * h * inter  # gate, up, down (Llama/Mistral/Qwen MLP)
    embed = cfg["vocab_size"] * h
    lm_head = 0 if cfg.get("tie_word_embeddings", False) else embed
    norms = layers * 2 * h + h
    return ModelShape(layers, kv, hd, layers * (attn + mlp), embed + lm_head + norms)


def kv_bytes_per_token(shape: ModelShape, kv_dtype_bytes: float) -> float:
    return shape.layers * 2 * shape.kv_heads * shape.head_dim * kv_dtype_bytes


@dataclass
class Candidate:
    name: str
    weight_bytes: float
    basis: str  # "store artifact <id>" | "nominal N bits/weight"


def nominal_candidate(name: str, shape: ModelShape, bits: float | None) -> Candidate:
    if bits is None:  # the dense model
        return Candidate(name, shape.params * 2, "config, 16-bit")
    return Candidate(name, shape.linear_params * bits / 8 + shape.other_params * 2, f"config, {bits:g} bits/weight")


def resolve_gpu(name: str) -> str:
    """A gpus.yaml key from its exact name or its model name when only one size is listed (`H200`)."""
    table = gpu_table()
    if name in table:
        return name
    hits = [k for k in table if k.split("-")[0].lower() == name.lower()]  # the model name alone: H200
    if len(hits) == 1:
        return hits[0]
    import difflib

    close = hits or difflib.get_close_matches(name, list(table), n=1)
    raise UserError(f"--gpu {name!r} unknown" + (f" (did you mean {' or '.join(close)}?)" if close else "") +
                    f"; known: {', '.join(table)}", fix=f"add it to {GPUS_FILE}")


def gpu_key_for_device(device_name: str) -> str:
    """The gpus.yaml key of a CUDA device name: "NVIDIA H200" -> H200-141GB, "NVIDIA A100-SXM4-80GB" -> A100-80GB,
    "NVIDIA GeForce RTX 4090" -> RTX4090-24GB; UserError where gpus.yaml has no single match."""
    import re

    words = [w.lower() for w in re.split(r"[\s_-]+", device_name) if w and w.lower() != "nvidia"]
    names = set(words) | {a + b for a, b in zip(words, words[1:])}  # "RTX 4090" -> rtx4090
    hits = [k for k in gpu_table() if k.split("-")[0].lower() in names]
    if len(hits) > 1:  # several sizes of one model: the size in the name decides
        hits = [k for k in hits if k.split("-")[-1].lower() in words]
    if len(hits) != 1:
        raise UserError(f"GPU {device_name!r} is not in {GPUS_FILE.name}", fix=f"add it to {GPUS_FILE}")
    return hits[0]


def plan_rows(shape: ModelShape, candidates: list[Candidate], gpu: str, gpus: int, batch: int, context: int,
              kv_dtype_bytes: float = 2, reserve_pct: float = 10.0) -> list[dict]:
    table = gpu_table()
    if gpu not in table:
        import difflib

        close = difflib.get_close_matches(gpu, list(table), n=1)
        raise UserError(f"--gpu {gpu!r} unknown" + (f" (did you mean {close[0]}?)" if close else "") +
                        f"; known: {', '.join(table)}", fix=f"add it to {GPUS_FILE}")
    capacity = gpus * table[gpu]["memory_gb"] * 1e9
    reserve = capacity * reserve_pct / 100
    per_seq = kv_bytes_per_token(shape, kv_dtype_bytes) * context
    rows = []
    for c in candidates:
        kv = per_seq * batch
        need = c.weight_bytes + kv + reserve
        room = capacity - reserve - c.weight_bytes
        rows.append({"name": c.name, "basis": c.basis, "weights_gb": c.weight_bytes / 1e9, "kv_gb": kv / 1e9,
                     "reserve_gb": reserve / 1e9, "need_gb": need / 1e9, "capacity_gb": capacity / 1e9,
                     "fits": need <= capacity, "max_batch": max(0, math.floor(room / per_seq)) if room > 0 else 0})
    return rows


def load_config(ref: str) -> dict:
    """config.json of a local dir / config file, or of a hub model already in the local HF cache."""
    p = Path(ref)
    if p.is_file() and p.name.endswith(".json"):
        return json.loads(p.read_text())
    if (p / "config.json").exists():
        return json.loads((p / "config.json").read_text())
    repo, _, rev = ref.removeprefix("hf://").partition("@")
    shipped = shipped_config(repo)
    if shipped is not None:  # the hub's numbers, shipped: planning needs no network
        return shipped
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(repo, "config.json", revision=rev or None)).read_text())
    except Exception as e:  # offline, gated, or not a repo: the user needs the same advice
        raise UserError(f"cannot read config.json for {ref!r} ({type(e).__name__})",
                        fix="give a local model dir or config.json, or run where the hub is reachable") from None


def shipped_config(repo: str) -> dict | None:
    """config.json of a hub model whose architecture ships in quantkit/data/architectures (hub.yaml)."""
    arch = Path(__file__).parent / "data" / "architectures"
    name = (yaml.safe_load((arch / "hub.yaml").read_text()) or {}).get(repo)
    return json.loads((arch / f"{name}.json").read_text()) if name else None


def recipe_config(spec, base_dir: Path) -> dict:
    """The architecture a recipe's model.source names, without loading weights (dummy sources included)."""
    src = spec.source
    if src.startswith("dummy:"):
        from quantkit.sources.dummy import arch_config

        cfg, _ = arch_config(src.removeprefix("dummy:"), base_dir)
        return {**cfg, "num_hidden_layers": spec.layers or cfg["num_hidden_layers"]}
    local = base_dir / src
    return load_config(str(local) if local.exists() else (f"{src}@{spec.revision}" if spec.revision else src))
