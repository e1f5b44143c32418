"""End to end on the real offline model (SmolLM2-135M-Instruct imported from its GGUF by `make model`)."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli
from quantkit.store.store import Store


def test_gguf_import_gives_a_working_dense_checkpoint_with_fixed_tokenizer(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_json = json.loads((smollm2 / "tokenizer.json").read_text())
    assert tok_json["model"]["byte_fallback"] is False and tok_json["decoder"]["type"] == "ByteLevel"
    assert json.loads((smollm2 / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    assert "quantization_config" not in json.loads((smollm2 / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1]:])


@pytest.mark.slow
def test_fp8_artifact_reloads_and_is_within_5pct_of_baseline(smollm2, tmp_path):
    store = tmp_path / "store"
    recipe = tmp_path / "smol-fp8.yaml"
    recipe.write_text(f"""\
name: smol-fp8
model: {{source: {smollm2}, dtype: float32}}
calibration: {{num_samples: 8, seq_len: 256}}
targets:
  - {{name: fp8-dynamic, format: fp8, scheme: dynamic}}
eval: {{perplexity: {{datasets: [wikitext2], seq_len: 512, max_windows: 8}}}}
store: {{uri: {store}}}
""")
    r = run_cli("build", str(recipe), "--json", "--report-dir", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["target"]: row for row in json.loads(r.stdout)["rows"]}
    base, fp8 = rows["baseline"]["ppl"]["wikitext2"], rows["fp8-dynamic"]["ppl"]["wikitext2"]
    assert 1 < base["ppl"] < 100  # a sane language model on WikiText-2, not noise
    assert 0 <= fp8["change_pct"] < 5.0, fp8  # measured here: about +3%
    # the artifact really is FP8 compressed-tensors, and reloads from the store's own files
    s = Store(str(store))
    m = next(m for m in s.list() if m["target"]["name"] == "fp8-dynamic")
    qc = m["info"]["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    assert m["total_size"] < 0.5 * rows["baseline"]["size_mb"] * 1e6  # fp32 baseline -> fp8 weights
    pulled = s.materialize(m["id"], tmp_path / "pulled")
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with safe_open(pulled / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.float8_e4m3fn
    model = AutoModelForCausalLM.from_pretrained(pulled)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
