"""`model.source: dummy:CONFIG`: random weights of a real architecture's shapes, for planning and benchmarks.

CONFIG is a shipped architecture (quantkit/data/architectures/NAME.json) or a config.json path; `model.layers`
overrides the number of decoder layers. The weights are drawn shard by shard on the fastest device present (the
GPU where there is one, as vLLM's dummy load format does) and written once as a safetensors checkpoint in the
cache, because every consumer downstream reads files: llm-compressor's model-free path, llama.cpp's converter,
the engines, and each target's fresh load (so no target ever copies another's model). Memory while drawing is
one shard, not the model. The tokenizer is the demo model's (the architecture's own is not available offline);
its ids all fall inside any larger vocabulary.

Artifacts from such a source are marked `weights: dummy`; their perplexity measures nothing and is not taken.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from quantkit.errors import UserError
from quantkit.util import cache_dir, sha256_json

PREFIX = "dummy:"
ARCH_DIR = Path(__file__).resolve().parent.parent / "data" / "architectures"
GENERATOR = "dummy/1"  # bump when the drawing below changes: it keys every artifact built from dummy weights
SHARD_BYTES = 2 * 1024**3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def shipped() -> list[str]:
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


def arch_config(name: str, base_dir: Path | None = None) -> tuple[dict, str]:
    """(config dict, what it was read from) for a shipped name or a config.json path."""
    if (ARCH_DIR / f"{name}.json").exists():
        return json.loads((ARCH_DIR / f"{name}.json").read_text()), name
    for p in ([base_dir / name] if base_dir else []) + [Path(name)]:
        if p.is_dir() and (p / "config.json").exists():
            p = p / "config.json"
        if p.is_file():
            try:
                return json.loads(p.read_text()), str(p.resolve())
            except json.JSONDecodeError as e:
                raise UserError(f"model.source: {p} is not valid JSON ({e.msg}, line {e.lineno})") from None
    raise UserError(f"model.source: dummy config {name!r} is neither a shipped architecture nor a config.json "
                    f"file", fix=f"use one of {', '.join(shipped())}, or a path to a config.json")


def demo_tokenizer_dir() -> Path:
    env = os.environ.get("QUANTKIT_DEMO_MODEL")
    repo = Path(__file__).resolve().parents[2] / "models" / "smollm2-135m-instruct"
    for p in ([Path(env)] if env else []) + [repo, Path.cwd() / "models" / "smollm2-135m-instruct"]:
        if (p / "tokenizer.json").exists():
            return p
    raise UserError("model.source: dummy weights take the demo model's tokenizer, but models/smollm2-135m-instruct "
                    "is absent", fix="run `make model` (or set QUANTKIT_DEMO_MODEL to a model dir with a tokenizer)")


def resolve_dummy(spec, base_dir: Path | None = None):
    """-> ModelSource of kind "dummy" over the materialized checkpoint (drawn once, then cached)."""
    import torch

    from quantkit.sources.resolve import ModelSource

    name = spec.source.removeprefix(PREFIX)
    config, origin = arch_config(name, base_dir)
    if spec.layers is not None:
        config = {**config, "num_hidden_layers": spec.layers}
    dtype = spec.dtype if spec.dtype != "auto" else "bfloat16"  # what the real checkpoints ship in
    config = {**config, "torch_dtype": dtype, "dtype": dtype}
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the two draw different numbers: keyed apart
    fingerprint = sha256_json({"config": config, "generator": GENERATOR, "device": device,
                               "tokenizer": _tokenizer_digest(demo_tokenizer_dir())})
    label = Path(name).stem if "/" in name or name.endswith(".json") else name
    out = cache_dir("dummy") / f"{label}-L{config['num_hidden_layers']}-{dtype}-{fingerprint[:12]}"
    if not (out / "quantkit-dummy.json").exists():
        _materialize(config, out, device)
        (out / "quantkit-dummy.json").write_text(json.dumps({"origin": origin, "device": device,
                                                              "generator": GENERATOR}, indent=1))
    from quantkit.sanity import RANDOM_WEIGHTS_MARKER

    if not (out / RANDOM_WEIGHTS_MARKER).exists():  # the baseline sanity check skips declared random weights
        (out / RANDOM_WEIGHTS_MARKER).write_text(json.dumps({"made_by": f"quantkit dummy source ({origin})"}))
    return ModelSource(uri=spec.source, kind="dummy", path=out, revision=None, fingerprint=fingerprint)


def _tokenizer_digest(tok_dir: Path) -> str:
    from quantkit.util import cached_sha256

    return sha256_json({n: cached_sha256(tok_dir / n) for n in TOKENIZER_FILES if (tok_dir / n).exists()})


def _shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes from the architecture itself (built on the meta device: no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k not in ("architectures",)})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    return [(n, tuple(p.shape)) for n, p in model.named_parameters(remove_duplicate=True)
            if not (tied and n == "lm_head.weight")]


def _draw(name: str, shape: tuple[int, ...], dtype, device: str, std: float):
    """Norm weights 1, everything else N(0, initializer_range): activations of a trained model's scale."""
    import torch

    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(int(sha256_json(name)[:8], 16))
    t = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen)
    return t.cpu()


def _materialize(config: dict, out: Path, device: str) -> None:
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, config["torch_dtype"])
    std = float(config.get("initializer_range", 0.02))
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for n, shape in _shapes(config):
        nbytes = dtype.itemsize * int(torch.tensor(shape).prod())
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((n, shape))
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: _draw(n, s, dtype, device, std) for n, s in shard}  # one shard in memory at a time
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(tmp / fname), metadata={"format": "pt", "quantkit": "dummy weights"})
        weight_map.update({n: fname for n in tensors})
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tok = demo_tokenizer_dir()
    for n in TOKENIZER_FILES:
        if (tok / n).exists():
            shutil.copyfile(tok / n, tmp / n)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
