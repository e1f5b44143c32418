"""The torch-compiled engine on CPU: real llm-compressor and ModelOpt artifacts of a tiny random Llama (and the
classic GPTQ v1 / AWQ GEMM exports) read from their files, every linear swapped for its kernel module.

Oracles: the perplexity the build recorded with the artifact's own engine (transformers through
compressed-tensors' decompression, or the ModelOpt reference decoder) on the same windows; the layout readers'
dequantized weights; torch's CPU build of tinygemm against the reference path. The GPU kernels (gemlite,
`_scaled_mm`) are checked on the GPU by scripts/bench_engine_gpu.py (docs/benchmarks/h200/)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from quantkit import report
from quantkit.evaluation.engines import get_engine, speed_engine
from quantkit.evaluation.engines.torch_compiled import TorchCompiledEngine
from quantkit.evaluation.kernels.linear import make_linear
from quantkit.evaluation.kernels.weights import read_artifact
from quantkit.evaluation.perplexity import make_windows, perplexity
from quantkit.store.store import Store

TARGETS = """\
  - {name: fp8-dynamic, format: fp8, scheme: dynamic}
  - {name: fp8-static, format: fp8, scheme: static}
  - {name: int8-w8a8, format: int8}
  - {name: gptq-g32, format: gptq, group_size: 32, export: [gptq]}
  - {name: gptq-g32-asym, format: gptq, group_size: 32, symmetric: false, export: [gptq]}
  - {name: awq-g32, format: awq, group_size: 32, n_grid: 4, export: [awq]}
  - {name: trtllm-fp8, format: trtllm, scheme: fp8}
  - {name: trtllm-int4-awq, format: trtllm, scheme: int4_awq, group_size: 32}"""
LAYOUTS = {"baseline": "dense", "fp8-dynamic": "compressed-tensors/float-quantized",
           "fp8-static": "compressed-tensors/float-quantized", "int8-w8a8": "compressed-tensors/int-quantized",
           "gptq-g32": "compressed-tensors/pack-quantized", "gptq-g32-asym": "compressed-tensors/pack-quantized",
           "awq-g32": "compressed-tensors/pack-quantized", "trtllm-fp8": "modelopt", "trtllm-int4-awq": "modelopt"}


@pytest.fixture(scope="module")
def built(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compiled")
    recipe = tmp / "tiny-compiled.yaml"
    recipe.write_text(f"name: tiny-compiled\nmodel: {{source: {tiny_llama}, dtype: float32}}\n"
                      "calibration: {dataset: c4, num_samples: 4, seq_len: 64, seed: 0}\n"
                      f"targets:\n{TARGETS}\n"
                      "eval: {perplexity: {datasets: [wikitext2], seq_len: 64, max_windows: 4}}\n"
                      f"store: {{uri: {tmp / 'store'}}}\n")
    r = run_cli("build", str(recipe), "--json", "--report-dir", str(tmp / "reports"))
    assert r.returncode == 0, r.stderr[-3000:]
    st = Store(str(tmp / "store"))
    out = {}
    for m in st.list():
        path = st.materialize(m["id"], tmp / "pulled" / m["id"]) if m["files"] else None
        out[m["target"]["name"]] = (m, path)
    return tiny_llama, out


def _entries(m, path):
    """(directory, label) of every checkpoint in an artifact: the artifact itself and its classic exports."""
    if path is None:
        return [(m["entry"], "baseline")]
    return [(path, m["target"]["name"])] + [(path / e["dir"], f"{m['target']['name']}/{e['dir']}")
                                            for e in m["info"].get("exports", {}).values()]


@pytest.mark.slow  # builds 8 artifacts with llm-compressor and ModelOpt (~3 min on 2 cores)
def test_every_artifact_scores_like_its_own_engine(built):
    """Correctness before speed: same windows, perplexity within 0.5% of the artifact's engine's."""
    from transformers import AutoTokenizer

    tiny, arts = built
    assert set(arts) == set(LAYOUTS)
    tok = AutoTokenizer.from_pretrained(tiny)
    engine = get_engine("torch-compiled")
    checked = []
    for name, (m, path) in arts.items():
        ref = m["metrics"]["perplexity"]["wikitext2"]
        windows = make_windows("wikitext2", tok, ref["tokenizer"], 64, 4)
        assert windows.key == ref["key"]
        for d, label in _entries(m, path):
            h = engine.load(d)
            assert not h.compiled and h.device == "cpu"
            assert h.layout == LAYOUTS[name] if d == path or path is None else h.layout in ("gptq-v1", "awq-gemm")
            r = perplexity(engine, h, windows)
            assert r["engine"] == "torch-compiled" and r["windows"] == 4
            assert abs(r["ppl"] / ref["ppl"] - 1) < 0.005, (label, r["ppl"], ref["ppl"], m["engine"])
            checked.append(label)
    assert {"gptq-g32/gptq-v1", "gptq-g32-asym/gptq-v1", "awq-g32/awq-gemm"} <= set(checked)


def _oracle_weights(m, path) -> dict[str, torch.Tensor]:
    """Dequantized weights from the independent readers (not the engine's mapping of them)."""
    from quantkit.evaluation.engines.modelopt_reference import CheckpointTensors, dequantized, read_quant_config
    from quantkit.formats.layouts.compressed_tensors import dequantize, read_compressed_tensors

    if (path / "hf_quant_config.json").exists():
        dense = dict(dequantized(CheckpointTensors(path), read_quant_config(path), torch.float32, {}))
        return {k.removesuffix(".weight"): v for k, v in dense.items() if k.endswith("proj.weight")}
    fmt = json.loads((path / "config.json").read_text())["quantization_config"]["format"]
    if fmt == "pack-quantized":
        return {k: dequantize(layer).float() for k, layer in read_compressed_tensors(path)[0].items()}
    # fp8 / int8: as transformers + compressed-tensors hold them (8-bit weight and its scale, applied per call)
    model = get_engine("transformers").load(path).model
    out = {}
    for n, mod in model.named_modules():
        if n.endswith("proj"):
            s = mod.weight_scale.detach().float()
            out[n] = mod.weight.detach().float() * (s.reshape(-1, 1) if s.numel() > 1 else s.reshape(()))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "baseline"])
def test_kernel_swap_matches_dequantized_weights(built, name):
    """Every linear's kernel module computes x @ W^T for the oracle's W (int4 exactly on the reference path;
    fp8/int8 up to their 8-bit activation quantization; tinygemm's CPU build within bf16 rounding)."""
    _, arts = built
    m, path = arts[name]
    oracle = _oracle_weights(m, path)
    _, linears, _, _ = read_artifact(path)
    assert sorted(linears) == sorted(oracle) and len(linears) == 14
    g = torch.Generator().manual_seed(0)
    for mod, qw in linears.items():
        assert torch.allclose(qw.dequantize(), oracle[mod], rtol=1e-6, atol=1e-7), mod
        # inputs in range of a static activation scale (|x / s| <= 448), else N(0, 0.25)
        x = torch.randn(5, qw.shape[1], generator=g) * (0.5 if qw.input_scale is None else 100 * float(qw.input_scale))
        xin = x * qw.pre_quant_scale.float() if qw.pre_quant_scale is not None else x
        want = xin @ oracle[mod].t()
        got = make_linear(qw, "cpu", torch.float32, {})(x)
        tol = 1e-5 if qw.kind == "int4" else 0.07  # 8-bit activation quantization of N(0, 0.25) inputs
        assert float((got - want).norm() / want.norm()) < tol, (mod, qw.kind)
        if qw.kind == "int4":
            tg = make_linear(qw, "cpu", torch.bfloat16, {"int4": "tinygemm"})(x.bfloat16()).float()
            assert float((tg - want).norm() / want.norm()) < 2e-2, mod


@pytest.mark.slow
def test_classic_exports_map_to_the_same_integers(built):
    """GPTQ v1 and AWQ GEMM exports become the same int4 kernel inputs as their compressed-tensors source."""
    _, arts = built
    for name, sub in (("gptq-g32", "gptq-v1"), ("gptq-g32-asym", "gptq-v1"), ("awq-g32", "awq-gemm")):
        _, path = arts[name]
        _, ct, _, _ = read_artifact(path)
        _, classic, _, layout = read_artifact(path / sub)
        assert layout == sub and sorted(ct) == sorted(classic)
        for mod in ct:
            assert torch.equal(ct[mod].q, classic[mod].q) and torch.equal(ct[mod].zero, classic[mod].zero), mod
            assert torch.equal(ct[mod].scale.half(), classic[mod].scale), mod  # classic layouts store fp16


@pytest.mark.slow
def test_throughput_on_cpu_records_engine_device_host_kernels(built):
    from types import SimpleNamespace

    _, arts = built
    m, path = arts["gptq-g32"]
    engine = get_engine("torch-compiled")
    spec = SimpleNamespace(prompt_len=8, gen_len=4, batch_sizes=[1, 2], repetitions=1, warmup=1, threads=None)
    r = engine.throughput(engine.load(path), spec)
    assert r["engine"] == "torch-compiled" and r["device"] == "cpu" and r["host"] and r["method"] == "eager"
    assert r["kernels"] == {"Int4Linear": ["reference"], "dense": ["reference"], "attention": ["matmul"],
                            "fused": ["mlp.gate_up_proj", "self_attn.qkv_proj"]}
    assert "torch" in r["kernel_versions"] and set(r["batches"]) == {"1", "2"}
    assert all(b["decode_tok_s"] > 0 and b["prefill_tok_s"] > 0 for b in r["batches"].values())


def test_speed_engine_choice_and_keys(monkeypatch):
    """On a CPU host artifacts are timed by their own engine (ModelOpt's reference decoder by none); with CUDA
    the compiled engine times transformers and ModelOpt artifacts, and its records get other keys."""
    from quantkit.evaluation.run import Want, measurable

    w = [Want("perplexity", "wikitext2", "p"), Want("throughput", "throughput", "t")]
    assert speed_engine("transformers").name == "transformers" and speed_engine("modelopt-dequant") is None
    cpu = measurable("transformers", w)
    assert [x.engine for x in cpu] == ["", "transformers"] and measurable("modelopt-dequant", w) == w[:1]
    assert measurable("transformers", cpu) == cpu  # idempotent: a specialised want keeps its key
    monkeypatch.setattr(TorchCompiledEngine, "available", lambda self: True)
    gpu = measurable("transformers", w)
    assert gpu[1].engine == "torch-compiled" and gpu[1].key != cpu[1].key and gpu[0] == cpu[0]
    assert measurable("modelopt-dequant", w)[1].key == gpu[1].key
    assert speed_engine("llama.cpp").name == "llama.cpp"


def test_kernel_choice_follows_the_measured_table():
    from quantkit.evaluation.kernels.choices import CPU, DATA, choose, kernel_set

    h200 = json.loads((DATA / "choices.json").read_text())["NVIDIA H200"]
    assert choose(h200, 64)["int4"] == h200["int4"]  # keyed by tokens: the module picks per call
    assert choose(h200, 64)["fp8"] == "scaled_mm-epilogue" and choose({}, 1)["int8"] == "gemlite"
    assert choose(h200, 1)["fuse"] == h200["fuse"] and "int8" not in choose({}, 1)["fuse"]
    from quantkit.evaluation.kernels.attention import check_variant

    assert all(check_variant(choose(h200, b)["attention"]) for b in (1, 8, 16, 64, 256))  # by batch, known
    cpu = kernel_set("cpu", 64)
    assert {k: v for k, v in cpu.items() if k != "fuse"} == CPU
    assert set(CPU.values()) == {"reference", "matmul"} and CPU["attention"] == "matmul"  # the reference paths


def _manifest(target, fmt, engine, device, decode, host="h1", key="k"):
    tp = {"engine": engine, "device": device, "host": host, "key": key, "kind": "throughput",
          "batches": {"1": {"prefill_tok_s": 10.0, "decode_tok_s": decode}},
          "roofline": {"bytes_per_token": 100 if fmt == "baseline" else 50, "decode_pct_of_bound": 50.0}}
    return {"id": f"r.{target}", "recipe": {"name": "r"}, "target": {"name": target, "format": fmt, "scheme": fmt},
            "engine": "transformers", "source": {"fingerprint": "src"}, "files": [],
            "info": {"weight_bytes": 100 if fmt == "baseline" else 50, "dense_reference": fmt == "baseline",
                     "quality_reference": fmt == "baseline"},
            "total_size": 0, "metrics": {"throughput": tp}}


def test_report_never_divides_across_devices_or_engines():
    base = _manifest("baseline", "baseline", "torch-compiled", "cuda:NVIDIA H200", 100.0)
    same = _manifest("fp8", "fp8", "torch-compiled", "cuda:NVIDIA H200", 150.0)
    other_dev = _manifest("fp8-h100", "fp8", "torch-compiled", "cuda:NVIDIA H100 80GB HBM3", 140.0)
    other_eng = _manifest("fp8-eager", "fp8", "transformers-eager", "cuda:NVIDIA H200", 20.0)
    other_host = _manifest("fp8-host2", "fp8", "torch-compiled", "cuda:NVIDIA H200", 150.0, host="h2")
    rows = {r["target"]: r for r in report.rows([base, same, other_dev, other_eng, other_host])}
    assert rows["fp8"]["decode_speedup"] == 1.5 and rows["fp8"]["speedup_bound"] == 2.0
    for t in ("fp8-h100", "fp8-eager", "fp8-host2"):
        assert "decode_speedup" not in rows[t], t
    md = report.to_markdown(list(rows.values()))
    line = next(x for x in md.splitlines() if x.startswith("| fp8-h100 |"))
    assert line.split(" | ")[-3:-1] == ["-", "-"]  # decode speedup and its bound
    note = report.speed_note(list(rows.values()))
    assert "`torch-compiled` on cuda:NVIDIA H200" in note and "`transformers-eager` on cuda:NVIDIA H200" in note
    assert "vLLM, SGLang or TensorRT-LLM" in note and note in md
