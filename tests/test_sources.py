"""Model sources: fingerprints, pickle and remote-code refusal, hub ids offline."""
from __future__ import annotations

import json
import shutil

import pytest

from quantkit.errors import UserError
from quantkit.recipe.schema import ModelSpec
from quantkit.sources.resolve import resolve_source


def test_local_fingerprint_is_stable_and_content_based(tiny_llama, tmp_path):
    a = resolve_source(ModelSpec(source=str(tiny_llama)))
    assert a.kind == "local" and len(a.fingerprint) == 64
    assert resolve_source(ModelSpec(source=str(tiny_llama))).fingerprint == a.fingerprint
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama, copy)
    assert resolve_source(ModelSpec(source=str(copy))).fingerprint == a.fingerprint  # content, not path
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5 if cfg.get("rms_norm_eps") != 1e-5 else 1e-6
    (copy / "config.json").write_text(json.dumps(cfg))
    assert resolve_source(ModelSpec(source=str(copy))).fingerprint != a.fingerprint


def test_relative_source_resolves_against_recipe_dir(tiny_llama, tmp_path):
    shutil.copytree(tiny_llama, tmp_path / "m")
    src = resolve_source(ModelSpec(source="m"), base_dir=tmp_path)
    assert src.path == (tmp_path / "m").resolve()


def test_pickle_weights_refused_unless_allowed(tiny_llama, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny_llama / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(UserError) as e:
        resolve_source(ModelSpec(source=str(d)))
    assert "pickle" in e.value.one_line() and "allow_pickle: true" in e.value.one_line()
    assert resolve_source(ModelSpec(source=str(d), allow_pickle=True)).kind == "local"


def test_remote_code_refused_unless_trusted(tiny_llama, tmp_path):
    d = tmp_path / "remote"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError) as e:
        resolve_source(ModelSpec(source=str(d)))
    assert "trust_remote_code: true" in e.value.one_line()


def test_hub_id_needs_revision_and_offline_uncached_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError, match="pinned revision"):
        resolve_source(ModelSpec(source="meta-llama/Llama-3.1-8B-Instruct"))
    with pytest.raises(UserError) as e:
        resolve_source(ModelSpec(source="meta-llama/Llama-3.1-8B-Instruct", revision="0" * 40))
    line = e.value.one_line()
    assert "not in the Hugging Face cache" in line and "\n" not in line


def test_missing_local_path_is_one_line(tmp_path):
    with pytest.raises(UserError, match="not found"):
        resolve_source(ModelSpec(source=str(tmp_path / "nope")))
