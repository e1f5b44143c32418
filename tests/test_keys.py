"""Artifact keys cover the bytes: the code that makes a format's artifact (one changed line in a format module
changes that format's ids and nothing else's), the resolved dtype and device, library versions; and never a
path. Unquantized tensors come out in the checkpoint's own dtype, whatever the host computed in."""
from __future__ import annotations

import functools
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from quantkit import build
from quantkit.code_identity import PACKAGE_ROOT, code_identity
from quantkit.context import BuildContext
from quantkit.formats import UNAVAILABLE
from quantkit.recipe.loader import load_recipe
from quantkit.sources.resolve import resolve_source

TARGETS = {  # one target per format whose module imports here; gguf and trtllm use no llm-compressor code
    "fp8": "{name: fp8-dynamic, format: fp8, scheme: dynamic}",
    "int8": "{name: w8a8, format: int8}",
    "gptq": "{name: gptq-w4, format: gptq, group_size: 32}",
    "awq": "{name: awq-w4, format: awq, group_size: 32}",
    "gguf": "{name: gguf, format: gguf, types: [Q8_0, Q4_K_M]}",
    "trtllm": "{name: trt-fp8, format: trtllm, scheme: fp8}",
}


def _recipe(tmp: Path, model: Path, targets: list[str], dtype: str = "float32") -> Path:
    f = tmp / "keys.yaml"
    body = "\n".join(f"  - {t}" for t in targets)
    f.write_text(f"name: keys\nmodel: {{source: {model}, dtype: {dtype}}}\n"
                 f"calibration: {{num_samples: 4, seq_len: 64}}\ntargets:\n{body}\n")
    return f


def _ids(recipe: Path, tmp: Path) -> dict[str, str]:
    loaded = load_recipe(recipe)
    ctx = BuildContext(loaded, resolve_source(loaded.recipe.model, loaded.path.parent), tmp)
    return {p.opts.name: p.artifact_id for p in build._plans(ctx, None)}


@pytest.fixture(scope="module")
def all_formats(tiny_llama, tmp_path_factory):
    from quantkit.formats import format_names

    names = [n for n in TARGETS if n in format_names()]
    if importlib.util.find_spec("llama_cpp") is None:  # GGUF type names come from the binding (optional here)
        names.remove("gguf")
    assert "fp8" in names, UNAVAILABLE
    tmp = tmp_path_factory.mktemp("keys")
    return _recipe(tmp, tiny_llama, [TARGETS[n] for n in names]), tmp


def _patched_package(tmp: Path, rel: str) -> Path:
    root = tmp / "patched" / "quantkit"
    if root.exists():
        shutil.rmtree(root.parent)
    shutil.copytree(PACKAGE_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    f = root / rel
    f.write_text(f.read_text() + "\n# one changed line\n")
    return root


def test_one_changed_line_changes_that_formats_ids_only(all_formats, monkeypatch):
    recipe, tmp = all_formats
    before = _ids(recipe, tmp)
    assert set(before) >= {"baseline", "fp8-dynamic"}
    assert _ids(recipe, tmp) == before  # deterministic

    def ids_with(rel: str) -> set[str]:
        root = _patched_package(tmp, rel)
        code_identity.cache_clear()
        monkeypatch.setattr(build, "code_identity", functools.partial(code_identity, root=root))
        after = _ids(recipe, tmp)
        monkeypatch.undo()
        return {name for name in before if after[name] != before[name]}

    assert ids_with("formats/fp8.py") == {"fp8-dynamic"}
    if "gguf" in recipe.read_text():
        assert ids_with("formats/gguf.py") == {"gguf-q8_0", "gguf-q4_k_m"}  # both variants of the one target
    assert ids_with("formats/trtllm.py") == {"trt-fp8"}
    # a helper changes the ids of exactly the formats that use it
    llmc = {n for n, t in (("fp8-dynamic", "fp8"), ("w8a8", "int8"), ("gptq-w4", "gptq"), ("awq-w4", "awq"))
            if n in before}
    assert ids_with("formats/_llmcompressor.py") == llmc
    assert ids_with("calibration.py") == set(before)  # how every format's input is drawn


def test_keys_hold_resolved_dtype_device_versions_and_no_path(all_formats, tiny_llama, tmp_path):
    recipe, _ = all_formats
    loaded = load_recipe(recipe)
    ctx = BuildContext(loaded, resolve_source(loaded.recipe.model, loaded.path.parent), tmp_path)
    plan = next(p for p in build._plans(ctx, None) if p.opts.name == "fp8-dynamic")
    k = plan.key_inputs
    assert k["dtype"] == "float32" and k["device"] == "cpu" and k["storage_dtype"] == "float32"
    assert {"torch", "transformers", "llmcompressor", "compressed-tensors", "python", "quantkit"} <= set(k["versions"])
    text = json.dumps(k)
    assert str(tiny_llama) not in text and "/" not in text  # content and settings only: no path
    # dtype auto resolves (fp32 on a CPU host) and is keyed as what it resolved to
    auto = _recipe(tmp_path, tiny_llama, [TARGETS["fp8"]], dtype="auto")
    assert _ids(auto, tmp_path)["fp8-dynamic"] == plan.artifact_id
    bf16 = _recipe(tmp_path, tiny_llama, [TARGETS["fp8"]], dtype="bfloat16")
    assert _ids(bf16, tmp_path)["fp8-dynamic"] != plan.artifact_id
    # the same model bytes elsewhere: the same ids
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(tiny_llama, moved)
    assert _ids(_recipe(tmp_path, moved, [TARGETS["fp8"]]), tmp_path)["fp8-dynamic"] == plan.artifact_id


def test_fp8_built_on_cpu_keeps_bf16_embeddings_and_is_smaller(tiny_llama, tmp_path):
    """A bf16 checkpoint, computed in fp32 on this CPU host: the artifact's unquantized tensors are bf16."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    src = tmp_path / "tiny-bf16"
    shutil.copytree(tiny_llama, src)
    for f in src.glob("*.safetensors"):
        f.unlink()
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).to(torch.bfloat16).save_pretrained(src)
    recipe = tmp_path / "bf16.yaml"
    recipe.write_text(f"name: bf16\nmodel: {{source: {src}}}\nbaseline: false\neval: {{perplexity: null}}\n"
                      f"targets:\n  - {TARGETS['fp8']}\nstore: {{uri: {tmp_path / 'store'}}}\n")
    result = build.run_build(load_recipe(recipe))
    (m,) = result.manifests
    assert m["build"]["key_inputs"]["dtype"] == "float32" and m["build"]["key_inputs"]["storage_dtype"] == "bfloat16"
    from quantkit.store.store import Store

    out = Store(str(tmp_path / "store")).materialize(m["id"], tmp_path / "pulled")
    dtypes = {}
    for f in out.glob("*.safetensors"):
        with safe_open(f, framework="pt") as sf:
            dtypes.update({n: sf.get_slice(n).get_dtype() for n in sf.keys()})
    assert dtypes["model.embed_tokens.weight"] == "BF16" and dtypes["lm_head.weight"] == "BF16"
    assert dtypes["model.norm.weight"] == "BF16" and dtypes["model.layers.0.input_layernorm.weight"] == "BF16"
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == "F8_E4M3"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    weights = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert weights(out) < weights(src)
    # and it loads and runs in transformers, as its consumers would load it
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_speed_keys_name_the_hardware_not_the_host():
    import socket

    from quantkit.evaluation.run import speed_context

    ctx = json.dumps(speed_context())
    assert socket.gethostname() not in ctx and "hardware" in ctx and "device" in ctx
