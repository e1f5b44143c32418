"""int8, gptq and awq targets (llm-compressor): real runs through `quantkit build`.

Fast: a tiny random Llama (hidden 64, intermediate 128, so q/k/v/o/gate/up have 64 inputs and down_proj 128)
with group sizes that divide (32) and one that does not (128) for the indivisible policy.
Slow: SmolLM2-135M with small calibration sets; quality bounds from the issue (W8A8 within 3 % of baseline,
W4 GPTQ/AWQ within 30 %, both better than round-to-nearest at the same group size)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from quantkit.formats.layouts import awq_gemm, gptq_v1
from quantkit.formats.layouts.compressed_tensors import dequantize, read_compressed_tensors
from quantkit.store.store import Store


def _recipe(path: Path, model: Path, store: Path, targets: str, calib: str, eval_: str, baseline=True) -> Path:
    path.write_text(f"name: {path.stem}\nmodel: {{source: {model}, dtype: float32}}\ncalibration: {calib}\n"
                    f"baseline: {str(baseline).lower()}\ntargets:\n{targets}\neval: {eval_}\nstore: {{uri: {store}}}\n")
    return path


def _build(recipe: Path, *args: str) -> dict:
    r = run_cli("build", str(recipe), "--json", "--report-dir", str(recipe.parent / "reports"), *args)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout)


def _by_target(store: Path) -> dict[str, dict]:
    return {m["target"]["name"]: m for m in Store(str(store)).list()}


def _files(store: Path, manifest: dict, dest: Path) -> Path:
    return Store(str(store)).materialize(manifest["id"], dest / manifest["target"]["name"])


def _check_classic(artifact: Path, sub: str, read) -> int:
    """Independent of the build's own check: the layout reader vs quantkit's compressed-tensors reader."""
    layers, _ = read_compressed_tensors(artifact)
    back = read(artifact / sub)
    assert sorted(back) == sorted(layers)
    for mod, layer in layers.items():
        assert torch.equal(back[mod]["weight"], dequantize(layer, scale=layer.scale.to(torch.float16))), mod
    return len(layers)


# ---------------------------------------------------------------- fast: tiny Llama

TINY_CALIB = "{dataset: c4, num_samples: 4, seq_len: 64, seed: 0}"
TINY_EVAL = "{perplexity: {datasets: [wikitext2], seq_len: 64, max_windows: 4}}"
TINY_TARGETS = """\
  - {name: int8-w8a8, format: int8}
  - {name: int8-w8a16-rtn, format: int8, scheme: w8a16, algorithm: rtn}
  - {name: gptq-g32, format: gptq, group_size: 32, export: [gptq]}
  - {name: gptq-w8-channel, format: gptq, bits: 8, group_size: -1, act_order: false, export: [gptq]}
  - {name: gptq-g128-fallback, format: gptq, group_size: 128, indivisible: fallback}
  - {name: gptq-g128-ignore, format: gptq, algorithm: rtn, group_size: 128, indivisible: ignore}
  - {name: awq-g32, format: awq, group_size: 32, n_grid: 4, export: [awq]}
  - {name: awq-g128-ignore, format: awq, group_size: 128, n_grid: 4, indivisible: ignore, export: [awq]}"""


@pytest.fixture(scope="module")
def tiny(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llmc")
    recipe = _recipe(tmp / "tiny-llmc.yaml", tiny_llama, tmp / "store", TINY_TARGETS, TINY_CALIB, TINY_EVAL)
    result = _build(recipe)
    return tmp, _by_target(tmp / "store"), result


def test_every_target_builds_reloads_and_is_evaluated(tiny):
    tmp, ms, result = tiny
    assert len(result["built"]) == 9 and result["cached"] == []
    for name, m in ms.items():
        assert m["metrics"]["perplexity"]["wikitext2"]["ppl"] > 1, name  # evaluated = reloaded by transformers
        if name == "baseline":
            continue
        info = m["info"]
        assert info["container"] == "compressed-tensors" and m["entry"] == "."
        assert info["quantization_config"]["quant_method"] == "compressed-tensors"
        for k in ("algorithm", "scheme", "bits", "group_size", "symmetric", "ignore"):
            assert k in info, (name, k)
        calibrated = name not in ("int8-w8a16-rtn", "gptq-g128-ignore")
        assert (m["calibration"] is not None) == calibrated, name
        if calibrated:
            assert m["calibration"]["num_samples"] == 4 and m["calibration"]["seq_len"] == 64


def test_int8_schemes(tiny):
    _, ms, _ = tiny
    w8a8 = ms["int8-w8a8"]
    assert w8a8["target"]["scheme"] == "INT8 W8A8 SQ0.8+GPTQ"
    assert w8a8["info"]["smoothing_strength"] == 0.8 and w8a8["info"]["algorithm"] == "smoothquant+gptq"
    g = w8a8["info"]["quantization_config"]["config_groups"]["group_0"]
    assert g["weights"]["num_bits"] == 8 and g["weights"]["strategy"] == "channel"
    assert g["input_activations"]["dynamic"] is True and g["input_activations"]["strategy"] == "token"
    w8a16 = ms["int8-w8a16-rtn"]
    assert w8a16["info"]["smoothing_strength"] is None and w8a16["info"]["algorithm"] == "rtn"
    assert w8a16["info"]["quantization_config"]["config_groups"]["group_0"]["input_activations"] is None


def test_gptq_options_reach_the_checkpoint(tiny):
    _, ms, _ = tiny
    g = ms["gptq-g32"]["info"]
    w = g["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"], w["symmetric"], w["actorder"]) == (4, 32, True, "weight")
    assert g["act_order"] == "weight" and g["dampening_frac"] == 0.01
    ch = ms["gptq-w8-channel"]["info"]
    w = ch["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["strategy"], w["actorder"]) == (8, "channel", None) and ch["group_size"] is None


@pytest.mark.parametrize("name,kind,sub,read", [("gptq-g32", "gptq", "gptq-v1", gptq_v1.read_gptq_v1),
                                                ("gptq-w8-channel", "gptq", "gptq-v1", gptq_v1.read_gptq_v1),
                                                ("awq-g32", "awq", "awq-gemm", awq_gemm.read_awq_gemm),
                                                ("awq-g128-ignore", "awq", "awq-gemm", awq_gemm.read_awq_gemm)])
def test_classic_exports_read_back_bit_exactly(tiny, tmp_path, name, kind, sub, read):
    tmp, ms, _ = tiny
    m = ms[name]
    ex = m["info"]["exports"][kind]
    assert ex["dir"] == sub and ex["readback"]["max_abs_diff"] == 0.0 and not ex["readback"]["missing"]
    assert ex["readback"]["layers"] == ex["layers"] and m["info"]["entry_bytes"] < m["total_size"]
    art = _files(tmp / "store", m, tmp_path)
    assert _check_classic(art, sub, read) == ex["layers"]
    qc = json.loads((art / sub / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == kind and json.loads((art / "config.json").read_text())[
        "quantization_config"]["quant_method"] == "compressed-tensors"
    if kind == "awq":
        assert qc["version"] == "gemm" and qc["zero_point"] is True
    if name == "awq-g128-ignore":  # policy-ignored layers stay fp16 and are listed for AutoAWQ loaders
        assert ex["layers"] == 2 and "re:.*\\.q_proj$" in m["info"]["ignore"]
        assert "model.layers.0.self_attn.q_proj" in qc["modules_to_not_convert"]


def test_fallback_gives_indivisible_layers_the_largest_dividing_group(tiny, tmp_path):
    tmp, ms, _ = tiny
    m = ms["gptq-g128-fallback"]
    info = m["info"]
    assert info["group_size"] == 128 and set(info["fallback"]) == {"64"}
    assert sorted(info["fallback"]["64"]) == sorted(f"re:.*\\.{p}$" for p in
                                                    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"))
    assert info["indivisible_layers"] == "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj in 2 layers: 64 % 128 != 0"
    layers, _ = read_compressed_tensors(_files(tmp / "store", m, tmp_path))
    sizes = {name.rsplit(".", 1)[1]: layer.group_size for name, layer in layers.items()}
    assert sizes == {"q_proj": 64, "k_proj": 64, "v_proj": 64, "o_proj": 64, "gate_proj": 64, "up_proj": 64,
                     "down_proj": 128} and len(layers) == 14


def test_ignore_policy_leaves_indivisible_layers_unquantized(tiny, tmp_path):
    tmp, ms, _ = tiny
    m = ms["gptq-g128-ignore"]
    assert m["info"]["indivisible_ignored"] == [f"re:.*\\.{p}$" for p in
                                                ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")]
    layers, other = read_compressed_tensors(_files(tmp / "store", m, tmp_path))
    assert sorted(layers) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert other["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32


@pytest.mark.parametrize("target,needles", [
    ("{name: g128, format: gptq, group_size: 128}",
     ["q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj in 2 layers: 64 % 128 != 0", "indivisible: fallback",
      "group_size: 64", "target g128"]),
    ("{name: a128, format: awq, group_size: 128}", ["64 % 128 != 0", "indivisible: ignore"]),
    ("{name: g128x, format: gptq, group_size: 128, indivisible: fallback, export: [gptq]}",
     ["export gptq", "one group size"]),
    ("{name: a128x, format: awq, group_size: 128, indivisible: fallback, export: [awq]}", ["export awq"]),
])
def test_indivisible_errors_are_one_line_before_llmcompressor(tiny_llama, tmp_path, target, needles):
    recipe = _recipe(tmp_path / "bad.yaml", tiny_llama, tmp_path / "s", f"  - {target}", TINY_CALIB, TINY_EVAL,
                     baseline=False)
    r = run_cli("build", str(recipe))
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "llmcompressor" not in r.stderr  # refused before the library ran
    for n in needles:
        assert n in errors[0], (n, errors[0])


@pytest.mark.parametrize("target,needles", [
    ("{name: x, format: int8, scheme: w8a16, smoothing_strength: 0.5}", ["w8a8 only"]),
    ("{name: x, format: int8, smoothing_strength: 1.5}", ["smoothing_strength"]),
    ("{name: x, format: gptq, group_size: 0}", ["group_size"]),
    ("{name: x, format: gptq, bits: 3}", ["bits"]),
    ("{name: x, format: gptq, export: [awq]}", ["export"]),
    ("{name: x, format: awq, bits: 8}", ["bits"]),
    ("{name: x, format: awq, indivisible: maybe}", ["indivisible", "fallback"]),
])
def test_bad_options_fail_validation_in_one_line(tmp_path, target, needles):
    recipe = _recipe(tmp_path / "bad.yaml", tmp_path, tmp_path / "s", f"  - {target}", TINY_CALIB, TINY_EVAL)
    r = run_cli("recipe", "validate", str(recipe))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def test_pin_memory_workaround_is_scoped():
    from llmcompressor.pipelines.cache import IntermediatesCache

    from quantkit.formats.awq import no_pin_memory_without_accelerator

    original = IntermediatesCache.pin_memory
    with no_pin_memory_without_accelerator():
        assert (IntermediatesCache.pin_memory is original) == torch.accelerator.is_available()
    assert IntermediatesCache.pin_memory is original


# ---------------------------------------------------------------- slow: SmolLM2-135M (hidden 576, intermediate 1536)

SMOL_WINDOWS = 4
SMOL_EVAL = f"{{perplexity: {{datasets: [wikitext2], seq_len: 512, max_windows: {SMOL_WINDOWS}}}}}"
# 16 x 256 C4 calibration tokens. Measured here (wikitext2, 8 x 512): symmetric GPTQ g64 is no better than
# round-to-nearest on this model (43.5 vs 44.1; its weights come from a Q4_1 GGUF, whose grid is asymmetric),
# asymmetric GPTQ is (35.9 vs 40.8), so the test's GPTQ target is asymmetric like AWQ's and both are compared with
# asymmetric round-to-nearest.
# Sized for CI's 2 cores (issue 13; one xdist worker, one thread; measured under load, nice 10):
# - INT8 W8A8 is SmoothQuant + round-to-nearest here: with GPTQ (the format's default, still built by the tiny
#   test above) its produce took 969 s (~690 CPU-s) against 28 s, and it landed at +2.92 % (8 windows), 0.08
#   points from the 3 % bound, where SmoothQuant + RTN gives +1.41 % (+1.28 % on the first 4 windows).
# - 4 windows of 512, not 8: per-window NLLs of an 8-window run, first 4: baseline 30.96, GPTQ 37.28 (+20.4 %),
#   AWQ 38.70 (+25.0 %), RTN g64 41.18, g128-fallback 41.03; GPTQ and AWQ below RTN in each of the 4 windows
#   (smallest gap 0.013 nats, AWQ window 3).
# - AWQ grid 5 points, not 10 (cost is grid points x calibration tokens): 37.66 vs 37.45 on 8 windows, the same
#   ordering in every window.
SMOL_TARGETS = """\
  - {name: int8-w8a8, format: int8, scheme: w8a8, algorithm: rtn}
  - {name: gptq-w4-g64, format: gptq, group_size: 64, symmetric: false, export: [gptq]}
  - {name: awq-w4-g64, format: awq, group_size: 64, n_grid: 5, export: [awq]}
  - {name: rtn-w4-g64, format: gptq, algorithm: rtn, group_size: 64, symmetric: false}
  - {name: rtn-w4-g128-fallback, format: gptq, algorithm: rtn, group_size: 128, symmetric: false, indivisible: fallback}"""


@pytest.fixture(scope="module")
def smol(smollm2, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smol-llmc")
    _build(_recipe(tmp / "smol-llmc.yaml", smollm2, tmp / "store", SMOL_TARGETS,
                   "{dataset: c4, num_samples: 16, seq_len: 256, seed: 0}", SMOL_EVAL))
    ms = _by_target(tmp / "store")
    for name, m in ms.items():
        print(f"\n[{name}] ppl {m['metrics']['perplexity']['wikitext2']['ppl']:.3f}, "
              f"produce {m['build']['produce_s']:.0f} s, {m['total_size'] / 1e6:.1f} MB")
    return tmp, ms


def _ppl(ms: dict, name: str) -> float:
    return ms[name]["metrics"]["perplexity"]["wikitext2"]["ppl"]


@pytest.mark.slow
def test_smollm2_quality_bounds(smol):
    _, ms = smol
    base = _ppl(ms, "baseline")
    assert _ppl(ms, "int8-w8a8") <= 1.03 * base
    assert _ppl(ms, "gptq-w4-g64") <= 1.30 * base
    assert _ppl(ms, "awq-w4-g64") <= 1.30 * base
    # the AWQ paper's ordering: calibrated W4 beats round-to-nearest (same group size, asymmetric)
    assert _ppl(ms, "gptq-w4-g64") < _ppl(ms, "rtn-w4-g64")
    assert _ppl(ms, "awq-w4-g64") < _ppl(ms, "rtn-w4-g64")


@pytest.mark.slow
@pytest.mark.parametrize("name,kind,sub,read", [("gptq-w4-g64", "gptq", "gptq-v1", gptq_v1.read_gptq_v1),
                                                ("awq-w4-g64", "awq", "awq-gemm", awq_gemm.read_awq_gemm)])
def test_smollm2_classic_exports_read_back_bit_exactly(smol, tmp_path, name, kind, sub, read):
    tmp, ms = smol
    ex = ms[name]["info"]["exports"][kind]
    assert ex["readback"]["max_abs_diff"] == 0.0 and ex["readback"]["layers"] == ex["layers"] == 210
    assert _check_classic(_files(tmp / "store", ms[name], tmp_path), sub, read) == 210


@pytest.mark.slow
def test_smollm2_g128_errors_by_default_and_builds_with_fallback(smol, smollm2, tmp_path):
    _, ms = smol
    fb = ms["rtn-w4-g128-fallback"]["info"]
    assert fb["fallback"] == {"96": [f"re:.*\\.{p}$" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj")]}  # 576 = 6 x 96; down_proj 1536 keeps 128
    assert _ppl(ms, "rtn-w4-g128-fallback") < 2 * _ppl(ms, "baseline")
    recipe = _recipe(tmp_path / "g128.yaml", smollm2, tmp_path / "s", "  - {name: gptq-g128, format: gptq}",
                     "{dataset: c4, num_samples: 2, seq_len: 64, seed: 0}", SMOL_EVAL, baseline=False)
    r = run_cli("build", str(recipe))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last == ("error: target gptq-g128: group_size 128 does not divide q_proj,k_proj,v_proj,o_proj,gate_proj,"
                    "up_proj in 30 layers: 576 % 128 != 0 (fix: set `indivisible: fallback` (per layer, the largest "
                    "group size that divides), `indivisible: ignore` (leave them unquantized), or `group_size: 64`)")
