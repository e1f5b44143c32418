"""A baseline must be a working model: the build stops before any target when it is not, in one line, with
nothing published; skipping is explicit and recorded in every manifest."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import run_cli
from quantkit.sanity import RANDOM_WEIGHTS_MARKER, ppl_limit
from quantkit.store.store import Store


def _recipe(tmp: Path, model: Path, targets: str = "[]", seq_len: int = 64) -> Path:
    f = tmp / "recipe.yaml"
    f.write_text(f"name: sanity\nmodel: {{source: {model}, dtype: float32}}\n"
                 f"calibration: {{dataset: c4, num_samples: 2, seq_len: 64, seed: 0}}\ntargets: {targets}\n"
                 f"eval: {{perplexity: {{datasets: [wikitext2], seq_len: {seq_len}, max_windows: 2}}}}\n"
                 f"store: {{uri: {tmp / 'store'}}}\n")
    return f


def _undeclared_copy(model: Path, dest: Path) -> Path:
    shutil.copytree(model, dest)
    (dest / RANDOM_WEIGHTS_MARKER).unlink()
    return dest


def test_random_model_is_refused_before_any_target(tiny_llama, tmp_path):
    model = _undeclared_copy(tiny_llama, tmp_path / "random")
    r = run_cli("build", str(_recipe(tmp_path, model, "[{name: fp8, format: fp8}]")))
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: baseline ") and "does not look like a working model" in line
    assert f"limit {ppl_limit(512):.0f}" in line and "Traceback" not in r.stderr
    assert "fp8" not in r.stderr.replace("fp8, format", "")  # no target started
    assert list(Store(str(tmp_path / "store")).list()) == []


def test_skips_are_explicit_and_recorded(tiny_llama, tmp_path):
    model = _undeclared_copy(tiny_llama, tmp_path / "random")
    r = run_cli("build", str(_recipe(tmp_path, model, "[{name: fp8, format: fp8}]")), "--no-sanity-check")
    assert r.returncode == 0, r.stderr[-2000:]
    ms = list(Store(str(tmp_path / "store")).list())
    assert len(ms) == 2 and all(m["sanity"] == {"status": "skipped", "reason": "--no-sanity-check"} for m in ms)
    # the test fixture's declaration of random weights is the other explicit skip
    r = run_cli("build", str(_recipe(_mk(tmp_path / "declared"), tiny_llama)))
    assert r.returncode == 0, r.stderr[-2000:]
    (m,) = Store(str(tmp_path / "declared" / "store")).list()
    assert m["sanity"]["status"] == "skipped" and RANDOM_WEIGHTS_MARKER in m["sanity"]["reason"]


def _mk(p: Path) -> Path:
    p.mkdir()
    return p


@pytest.mark.slow
def test_demo_model_passes_and_a_broken_copy_does_not(smollm2, tmp_path):
    """SmolLM2 passes (ppl and continuations recorded); the same model with the rows of every layer's q_proj,
    k_proj and down_proj permuted (the kind of damage a wrong GGUF import does) is stopped before any target."""
    import torch
    from safetensors.torch import load_file, save_file

    r = run_cli("build", str(_recipe(_mk(tmp_path / "good"), smollm2, seq_len=128)))
    assert r.returncode == 0, r.stderr[-2000:]
    (m,) = Store(str(tmp_path / "good" / "store")).list()
    s = m["sanity"]
    assert s["status"] == "passed" and s["ppl"] < 100 < s["ppl_limit"] and s["probes_right"] >= 2

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in smollm2.iterdir():
        if f.suffix != ".safetensors":
            (broken / f.name).symlink_to(f)
    weights = load_file(smollm2 / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for k in [k for k in weights if k.endswith(("q_proj.weight", "k_proj.weight", "down_proj.weight"))]:
        weights[k] = weights[k][torch.randperm(weights[k].shape[0], generator=g)].contiguous()
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    del weights
    r = run_cli("build", str(_recipe(_mk(tmp_path / "bad"), broken, "[{name: fp8, format: fp8}]", seq_len=128)))
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "does not look like a working model" in line and "Traceback" not in r.stderr
    assert list(Store(str(tmp_path / "bad" / "store")).list()) == []
    json.dumps(s)  # the record is plain JSON (it goes into every manifest)
