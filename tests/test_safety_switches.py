"""`trust_remote_code` and `allow_pickle` hold in every path: source resolution (local and hub cache), the
build's model and tokenizer, every evaluation engine, and llama.cpp's converter.

The "remote code" here is real: a checkpoint whose config/tokenizer `auto_map` points at a Python file in the
checkpoint that, when imported, writes a sentinel file. A refusal must leave no sentinel; an allowed load runs it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from quantkit.errors import UserError
from quantkit.recipe.schema import ModelSpec
from quantkit.sources.remote_code import EXIT_REFUSED, MARKER, RemoteCodeRefused, refuse_remote_code
from quantkit.sources.resolve import resolve_source

CUSTOM_CODE = """
import os, pathlib
pathlib.Path(os.environ["QK_SENTINEL"]).write_text("remote code ran")
from transformers import LlamaConfig, LlamaForCausalLM


class QKConfig(LlamaConfig):
    model_type = "qk-custom"


class QKForCausalLM(LlamaForCausalLM):
    config_class = QKConfig
"""


@pytest.fixture
def sentinel(tmp_path, monkeypatch) -> Path:
    s = tmp_path / "sentinel"
    monkeypatch.setenv("QK_SENTINEL", str(s))
    return s


@pytest.fixture
def custom_model(tiny_llama, tmp_path) -> Path:
    """tiny_llama whose architecture exists only as the checkpoint's own code (model_type unknown to transformers)."""
    import shutil

    # a directory name per test: transformers caches imported remote modules by it, and each test must see
    # whether the code runs
    d = tmp_path / f"custom_{''.join(c if c.isalnum() else '_' for c in tmp_path.name)}"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="qk-custom", architectures=["QKForCausalLM"],
               auto_map={"AutoConfig": "custom_code.QKConfig", "AutoModelForCausalLM": "custom_code.QKForCausalLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "custom_code.py").write_text(CUSTOM_CODE)
    return d


def test_source_with_tokenizer_auto_map_is_refused_unless_trusted(tiny_llama, tmp_path):
    import shutil

    d = tmp_path / "tok"
    shutil.copytree(tiny_llama, d)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": ["tok_code.QKTokenizer", None]}
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(UserError, match="tokenizer_config.json auto_map"):
        resolve_source(ModelSpec(source=str(d)))
    assert resolve_source(ModelSpec(source=str(d), trust_remote_code=True)).kind == "local"


@pytest.mark.parametrize("engine_name", ["transformers", "modelopt-dequant"])
def test_every_engine_refuses_remote_code_unless_allowed(custom_model, sentinel, engine_name):
    """What evaluate() does around every engine.load: the flag passed on, the guard around it."""
    from quantkit.evaluation.engines import get_engine

    engine = get_engine(engine_name)
    with pytest.raises(RemoteCodeRefused) as e, refuse_remote_code(False):
        engine.load(custom_model, ".", dtype="float32", trust_remote_code=False)
    assert "own" in e.value.one_line() and "trust_remote_code: true" in e.value.one_line()
    assert not sentinel.exists()
    # even code that asks for remote code explicitly (as llama.cpp's converter does) is refused
    with pytest.raises(RemoteCodeRefused), refuse_remote_code(False):
        engine.load(custom_model, ".", dtype="float32", trust_remote_code=True)
    assert not sentinel.exists()
    if engine_name == "transformers":  # allowed: the checkpoint's code really runs (the test can fail)
        with refuse_remote_code(True):
            handle = engine.load(custom_model, ".", dtype="float32", trust_remote_code=True)
        assert sentinel.exists() and type(handle.model).__name__ == "QKForCausalLM"


def test_build_context_tokenizer_and_model_follow_the_recipe(custom_model, sentinel, tmp_path):
    from quantkit.context import BuildContext
    from quantkit.recipe.loader import load_recipe
    from quantkit.sources.resolve import check_local

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {{source: {custom_model}, trust_remote_code: true, dtype: float32}}\n")
    loaded = load_recipe(recipe)
    ctx = BuildContext(loaded, check_local(custom_model, loaded.recipe.model, "x", "local"), tmp_path / "w")
    assert ctx.load_kwargs == {"trust_remote_code": True, "use_safetensors": True}
    assert type(ctx.load_model("layerwise")).__name__ == "QKForCausalLM" and sentinel.exists()


def _script(tmp_path: Path, model: Path) -> Path:
    """What llama.cpp's converter does for several architectures (conversion/base.py, deepseek.py, glm.py ...)."""
    s = tmp_path / "convert_like.py"
    s.write_text(textwrap.dedent(f"""
        import sys
        from transformers import AutoConfig
        try:  # the converter's fallbacks catch Exception: the refusal must not be swallowed by them
            AutoConfig.from_pretrained({str(model)!r}, trust_remote_code=True)
        except Exception as e:
            print("fallback path taken:", type(e).__name__)
        print("converted", sys.argv[1:])
        """))
    return s


def test_converter_wrapper_refuses_hard_coded_trust_remote_code(custom_model, sentinel, tmp_path):
    script = _script(tmp_path, custom_model)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "quantkit.sources.remote_code", str(script), "--outtype", "f16"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == EXIT_REFUSED and not sentinel.exists(), r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(MARKER) and "converted" not in r.stdout
    allowed = subprocess.run([sys.executable, "-m", "quantkit.sources.remote_code", "--allow", str(script), "x"],
                             capture_output=True, text=True, env=env)
    assert allowed.returncode == 0 and "converted ['x']" in allowed.stdout and sentinel.exists(), allowed.stderr


QWEN_TOKENIZER_CODE = """
import os, pathlib
pathlib.Path(os.environ["QK_SENTINEL"]).write_text("remote code ran")
from transformers import PreTrainedTokenizerFast


class QKTokenizer(PreTrainedTokenizerFast):
    pass
"""


@pytest.fixture
def qwen_like(tiny_llama, tmp_path) -> Path:
    """A checkpoint of architecture QWenLMHeadModel whose tokenizer is its own code: llama.cpp's converter loads
    such tokenizers with `trust_remote_code=True` hard-coded (conversion/base.py `_set_vocab_qwen`)."""
    import shutil

    d = tmp_path / f"qwen_{''.join(c if c.isalnum() else '_' for c in tmp_path.name)}"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["QWenLMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.update(tokenizer_class="QKTokenizer", auto_map={"AutoTokenizer": ["tok_code.QKTokenizer", None]})
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    (d / "tok_code.py").write_text(QWEN_TOKENIZER_CODE)
    return d


def _real_converter() -> Path:
    from quantkit.toolchain.llama_cpp import convert_script

    try:
        return convert_script()
    except UserError as e:
        pytest.skip(f"llama.cpp converter not installed ({e.one_line()})")


@pytest.mark.slow  # llama.cpp's real converter in fresh processes (it imports torch and transformers)
def test_real_converter_runs_remote_code_unguarded_and_is_refused_under_quantkit(qwen_like, sentinel, tmp_path):
    """--vocab-only: the tokenizer step of llama.cpp's real converter, where the hard-coded flag sits."""
    from quantkit.toolchain.llama_cpp import convert_env

    script = _real_converter()
    env = convert_env({**os.environ, "PYTHONPATH": str(ROOT)})
    args = [str(qwen_like), "--vocab-only", "--outfile", str(tmp_path / "v.gguf")]
    r = subprocess.run([sys.executable, "-m", "quantkit.sources.remote_code", str(script), *args],
                       capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == EXIT_REFUSED and not sentinel.exists(), r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(MARKER) and not (tmp_path / "v.gguf").exists()
    # the hazard is real: the same converter run the plain way executes the checkpoint's code
    subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                   stdin=subprocess.DEVNULL)
    assert sentinel.exists()


@pytest.mark.slow  # llama.cpp's real converter in fresh processes (it imports torch and transformers)
def test_gguf_convert_fails_in_one_line_when_the_model_needs_remote_code(qwen_like, sentinel, tmp_path,
                                                                          monkeypatch):
    """gguf.convert as a build runs it (the real converter, here stopped after its tokenizer step)."""
    from quantkit.formats import gguf
    from quantkit.toolchain import llama_cpp

    script = _real_converter()
    env = llama_cpp.convert_env()
    vocab_only = tmp_path / "convert_vocab_only.py"
    vocab_only.write_text(f"import runpy, sys\nsys.argv = [{str(script)!r}, *sys.argv[1:], '--vocab-only']\n"
                          f"sys.path.insert(0, {str(script.parent)!r})\n"
                          f"runpy.run_path({str(script)!r}, run_name='__main__')\n")
    monkeypatch.setattr(llama_cpp, "convert_script", lambda: vocab_only)
    monkeypatch.setattr(llama_cpp, "convert_env", lambda base=None: env)

    class Ctx:  # what gguf.convert reads from a BuildContext
        workdir = tmp_path / "work"

        class recipe:
            class model:
                trust_remote_code = False

        class source:
            path = qwen_like
            fingerprint = "0" * 64

    with pytest.raises(UserError) as e:
        gguf.convert(Ctx, "F16")
    line = e.value.one_line()
    assert len(line.splitlines()) == 1 and not sentinel.exists(), line
    assert "needs remote code" in line and "trust_remote_code: true" in line, line


# ---- allow_pickle: allows .bin, never prefers it ----

def _pickled(tiny_llama, tmp_path, with_safetensors: bool) -> Path:
    """tiny_llama's config; .bin weights that differ from the safetensors ones (to see which were loaded)."""
    import shutil

    from transformers import AutoModelForCausalLM

    d = tmp_path / ("both" if with_safetensors else "bin-only")
    shutil.copytree(tiny_llama, d, ignore=shutil.ignore_patterns("*.safetensors"))
    other = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        other.model.embed_tokens.weight.add_(1.0)
    torch.save(other.state_dict(), d / "pytorch_model.bin")  # transformers 5 writes safetensors only
    if with_safetensors:
        shutil.copy(tiny_llama / "model.safetensors", d / "model.safetensors")
    return d


def _ctx(d: Path, tmp_path: Path, allow: bool):
    from quantkit.context import BuildContext
    from quantkit.recipe.loader import load_recipe

    recipe = tmp_path / f"r-{d.name}-{allow}.yaml"
    recipe.write_text(f"name: r\nmodel: {{source: {d}, allow_pickle: {str(allow).lower()}, dtype: float32}}\n")
    loaded = load_recipe(recipe)
    return BuildContext(loaded, resolve_source(loaded.recipe.model), tmp_path / "w")


def test_allow_pickle_allows_bin_and_still_prefers_safetensors(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    ref = load_file(tiny_llama / "model.safetensors")["model.embed_tokens.weight"]
    bin_only = _pickled(tiny_llama, tmp_path, with_safetensors=False)
    with pytest.raises(UserError, match="only pickle weights"):
        _ctx(bin_only, tmp_path, allow=False)
    got = _ctx(bin_only, tmp_path, allow=True).load_model("layerwise").model.embed_tokens.weight
    assert torch.equal(got, ref + 1.0)  # the .bin was loaded: allowed
    both = _pickled(tiny_llama, tmp_path, with_safetensors=True)
    got = _ctx(both, tmp_path, allow=True).load_model("layerwise").model.embed_tokens.weight
    assert torch.equal(got, ref)  # safetensors present: used, though pickle is allowed (not forced)


def test_hub_cache_bin_only_needs_allow_pickle_and_fetches_bin_only_then(tiny_llama, tmp_path):
    """A hub id resolved from a real HF cache layout (offline): .bin is used only when allowed, and an allowed
    repo without safetensors asks for its .bin files (here: not cached, offline -> one line naming them)."""
    sha = "a" * 40
    snap = tmp_path / "hub" / "models--org--tiny" / "snapshots" / sha
    snap.mkdir(parents=True)
    bin_dir = _pickled(tiny_llama, tmp_path, with_safetensors=False)
    for f in bin_dir.iterdir():
        if f.name != "pytorch_model.bin":
            (snap / f.name).write_bytes(f.read_bytes())
    code = ("import sys; from quantkit.recipe.schema import ModelSpec; from quantkit.sources.resolve import "
            f"resolve_source; from quantkit.errors import UserError\ntry: print(resolve_source(ModelSpec("
            f"source='org/tiny', revision='{sha}', allow_pickle=sys.argv[1] == '1')).path)\n"
            "except UserError as e: print(e.one_line())")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}

    def resolve(allow: bool) -> str:
        r = subprocess.run([sys.executable, "-c", code, "1" if allow else "0"], capture_output=True, text=True,
                           env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.strip()

    assert "no weight files" in resolve(False)
    assert "not in the Hugging Face cache with *.bin, *.pt, *.pth files" in resolve(True)
    (snap / "pytorch_model.bin").write_bytes((bin_dir / "pytorch_model.bin").read_bytes())
    assert "only pickle weights" in resolve(False)
    assert resolve(True) == str(snap)
