"""GGUF through llama.cpp on the real SmolLM2-135M: one build (F16, Q8_0, Q4_K_M, Q4_K_M+imatrix) shared by the
tests; quality under the common protocol, llama.cpp's own tools (llama-imatrix, llama-quantize, llama-perplexity,
llama-bench) as the producer and measurer, file metadata."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from quantkit.store.store import Store

from quantkit.toolchain.llama_cpp import LLAMA_CPP_PYTHON_VERSION, backend_of, binding, find_tool

gguf = pytest.importorskip("gguf")
llama_cpp = binding()  # the pure-Python binding on the cached build's libllama


def _tool(name: str) -> Path:
    from quantkit.errors import UserError
    from quantkit.toolchain.llama_cpp import find_tool

    try:
        return find_tool(name)
    except UserError as e:
        pytest.skip(f"{name} not installed ({e.one_line()})")


# 4 windows (and 4 llama-perplexity chunks) of 512 tokens: this build is the suite's costliest (~490 CPU-s with 8:
# five perplexity passes and four llama-perplexity runs on the real model). The orderings asserted below do not
# need 8; per-window NLLs of a run with 8, first 4 windows: Q4_K_M+imatrix 31.89 < Q4_K_M 32.55 (better in each
# of the 4), Q8_0 31.20, F16 30.963 = baseline 30.963
WINDOWS = 4


def _recipe(tmp: Path, model: Path, store: Path) -> Path:
    f = tmp / "gguf.yaml"
    f.write_text(f"""\
name: gguf-test
model: {{source: {model}, dtype: float32}}
calibration: {{dataset: c4, num_samples: 16, seq_len: 256, seed: 0}}
targets:
  - {{name: gguf, format: gguf, types: [F16, Q8_0, Q4_K_M], llama_cpp_ppl_chunks: {WINDOWS}}}
  - {{name: gguf-imat, format: gguf, types: [Q4_K_M], imatrix: true, llama_cpp_ppl_chunks: {WINDOWS}}}
eval:
  perplexity: {{datasets: [wikitext2], seq_len: 512, max_windows: {WINDOWS}}}
  throughput: {{prompt_len: 32, gen_len: 8, repetitions: 1, warmup: 0}}
store: {{uri: {store}}}
""")
    return f


@pytest.fixture(scope="module")
def built(smollm2, tmp_path_factory):
    _tool("llama-quantize")  # skips when llama.cpp's tools were never built
    tmp = tmp_path_factory.mktemp("gguf")
    store = tmp / "store"
    r = run_cli("build", str(_recipe(tmp, smollm2, store)), "--json", "--report-dir", str(tmp / "reports"))
    assert r.returncode == 0, r.stderr[-3000:]
    s = Store(str(store))
    by_name = {m["target"]["name"]: m for m in s.list()}
    (tmp / "build.json").write_text(r.stdout)
    return s, by_name, tmp


def _file(built, target: str) -> Path:
    s, by_name, tmp = built
    m = by_name[target]
    d = tmp / "pulled" / target
    if not d.exists():
        s.materialize(m["id"], d)
    return d / m["entry"]


def _ppl(m: dict) -> float:
    return m["metrics"]["perplexity"]["wikitext2"]["ppl"]


def test_variants_and_manifests(built):
    s, by_name, tmp = built
    assert set(by_name) == {"baseline", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "gguf-imat-q4_k_m"}
    for name in ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m"):
        m = by_name[name]
        assert m["engine"] == "llama.cpp" and m["entry"].endswith(".gguf")
        assert m["calibration"] is None and m["info"]["imatrix"] == {"used": False}
        assert [f["path"] for f in m["files"]] == [m["entry"]]
    imat = by_name["gguf-imat-q4_k_m"]
    assert imat["calibration"]["num_samples"] == 16 and imat["calibration"]["seq_len"] == 256
    im = imat["info"]["imatrix"]
    assert im["used"] and im["method"].startswith("llama-imatrix") and im["chunk_size"] == 256
    assert 14 <= im["chunks"] <= 16 and im["entries"] == 210, im  # 30 layers x 7 linears (tied lm_head: none)
    assert imat["info"]["quantized_by"] == "llama-quantize" and "quantized_by" not in by_name["gguf-f16"]["info"]
    assert sorted(f["path"] for f in imat["files"]) == sorted([imat["entry"], "imatrix.gguf"])
    for name in ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "gguf-imat-q4_k_m"):  # where each stage ran (issue 10)
        devices = by_name[name]["build"]["devices"]
        assert devices["convert"] == "cpu (convert_hf_to_gguf.py)", devices
        assert ("quantize" in devices) == (name != "gguf-f16")
        assert ("importance matrix" in devices) == (name == "gguf-imat-q4_k_m"), devices
    where, backend = imat["build"]["devices"]["importance matrix"], backend_of(find_tool("llama-imatrix"))
    if backend == "cuda" and torch.cuda.is_available():  # the GPU, named
        assert where.startswith(f"cuda:0 ({torch.cuda.get_device_name(0)})") or " x " in where, where
    else:
        why = "llama.cpp CUDA build, no CUDA device visible" if backend == "cuda" else f"llama.cpp {backend} build"
        assert where == f"cpu ({why}; {imat['info']['threads']} threads)", where
    for m in by_name.values():
        if m["engine"] != "llama.cpp":
            continue
        met = m["metrics"]["perplexity"]["wikitext2"]
        assert met["engine"] == "llama.cpp" and met["windows"] == WINDOWS and met["protocol"] == "gptq-concat/2"
        # the orchestrator's speed record comes from llama-bench itself
        tp = m["metrics"]["throughput"]
        assert tp["engine"] == "llama.cpp" and tp["tool"] == "llama-bench" and tp["device"] == "cpu"
        assert tp["build"]["backend"] == "cpu" and "-DBUILD_SHARED_LIBS=ON" in tp["build"]["cmake_options"]
        assert tp["threads"] >= 1 and tp["versions"]["llama.cpp"].endswith(LLAMA_CPP_PYTHON_VERSION)
        assert tp["batches"]["1"]["decode_tok_s"] > 0 and tp["batches"]["1"]["prefill_tok_s"] > 0
        assert tp["dtype"] == m["info"]["type"] and tp["peak_memory_mb"] > 50
        # llama.cpp's own perplexity protocol, a check the format declared and the evaluation layer ran
        lp = m["checks"]["llama-perplexity"]
        assert lp["tool"] == "llama-perplexity" and lp["chunks"] == WINDOWS and lp["n_ctx"] == 512
        assert lp["tokens_scored"] == WINDOWS * 255 and 1 < lp["ppl"] < 100 and lp["file"] == "wiki.test.raw"
        info = m["info"]
        assert 0 < info["bits_per_weight"] <= 16.5 and info["file_size"] > 0
    stages = [st["stage"] for st in json.loads((tmp / "build.json").read_text())["stages"]]
    assert "load model (once)" not in stages  # GGUF never uses the in-memory model: llama.cpp reads files


def test_report_compares_gguf_speed_with_f16_in_llama_cpp(built):
    from quantkit.report import rows

    s, by_name, _ = built
    assert by_name["gguf-f16"]["info"]["dense_reference"] and not by_name["gguf-q8_0"]["info"]["dense_reference"]
    rs = {r["target"]: r for r in rows(s.list())}
    f16, q8 = rs["gguf-f16"], rs["gguf-q8_0"]
    assert f16["speed_engine"] == q8["speed_engine"] == "llama.cpp" and f16["decode_speedup"] == 1.0
    assert q8["decode_speedup"] == round(q8["decode_tok_s"] / f16["decode_tok_s"], 3)
    # Q8_0 reads about half the bytes of F16 per token: the bound says so
    assert 1.6 < q8["speedup_bound"] < 2.0, q8


def test_f16_matches_transformers_baseline(built):
    _, by_name, _ = built
    base, f16 = _ppl(by_name["baseline"]), _ppl(by_name["gguf-f16"])
    # same token ids, same windows: only fp16 weights and llama.cpp's kernels differ
    assert by_name["gguf-f16"]["metrics"]["perplexity"]["wikitext2"]["key"] == \
        by_name["baseline"]["metrics"]["perplexity"]["wikitext2"]["key"]
    assert abs(f16 / base - 1) < 0.005, (f16, base)


def test_imatrix_beats_plain_q4_k_m(built):
    _, by_name, _ = built
    plain, imat = by_name["gguf-q4_k_m"], by_name["gguf-imat-q4_k_m"]
    assert _ppl(imat) < _ppl(plain), (_ppl(imat), _ppl(plain))
    assert imat["checks"]["llama-perplexity"]["ppl"] < plain["checks"]["llama-perplexity"]["ppl"]
    assert _ppl(by_name["gguf-q8_0"]) < _ppl(plain)


def test_gguf_metadata_and_tensor_types(built):
    _, by_name, _ = built
    expect = {"gguf-f16": (llama_cpp.LLAMA_FTYPE_MOSTLY_F16, {"F16", "F32"}),
              "gguf-q8_0": (llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, {"Q8_0", "F32"}),
              "gguf-q4_k_m": (llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, {"Q4_K", "Q5_0", "Q6_K", "F32"})}
    for name, (ftype, must_have) in expect.items():
        r = gguf.GGUFReader(str(_file(built, name)))
        assert r.fields["general.architecture"].contents() == "llama"
        assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
        assert r.fields["general.file_type"].contents() == ftype
        assert len(r.tensors) == 272
        mix: dict[str, int] = {}
        for t in r.tensors:
            mix[t.tensor_type.name] = mix.get(t.tensor_type.name, 0) + 1
        assert must_have <= set(mix), mix
        assert by_name[name]["info"]["tensor_types"] == mix  # the manifest reports what was written
    q4 = by_name["gguf-q4_k_m"]["info"]
    # hidden size 576 is not a multiple of 256: most "Q4_K_M" tensors fall back to Q5_0, and the log said so
    assert q4["tensor_types"]["Q5_0"] > q4["tensor_types"]["Q4_K"]
    assert any("fallback" in w for w in q4["fallback_warnings"])
    assert 4.5 < q4["bits_per_weight"] < 7 and by_name["gguf-f16"]["info"]["bits_per_weight"] == pytest.approx(16, abs=0.1)
    assert q4["ftype"] == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M  # llama-quantize's list agrees with the binding


def test_imatrix_file_is_reusable_by_llama_quantize(built, tmp_path):
    """The artifact is reproducible from what it ships: `llama-quantize --imatrix imatrix.gguf` on the F16 artifact
    writes the same tensors."""
    from quantkit.toolchain.llama_cpp import run_tool

    _, by_name, _ = built
    imat_gguf = _file(built, "gguf-imat-q4_k_m")
    out = tmp_path / "cli-Q4_K_M.gguf"
    p = run_tool("llama-quantize", ["--imatrix", imat_gguf.parent / "imatrix.gguf", _file(built, "gguf-f16"), out,
                                    "Q4_K_M", "2"])
    assert "loaded 210 importance matrix entries" in p.stdout + p.stderr
    ours = {t.name: t for t in gguf.GGUFReader(str(imat_gguf)).tensors}
    cli = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    assert ours.keys() == cli.keys()
    for name, t in ours.items():
        assert t.tensor_type == cli[name].tensor_type and bytes(t.data) == bytes(cli[name].data), name


def test_bad_type_names_are_one_line(smollm2, tmp_path):
    for bad, hint in (("types: [F16, Q4_K_X]", "Q4_K_"), ("types: [q4_k_m]\n    output_tensor_type: Q9_9", "Q")):
        f = tmp_path / "bad.yaml"
        f.write_text(f"name: bad\nmodel: {{source: {smollm2}}}\ntargets:\n  - name: g\n    format: gguf\n    {bad}\n")
        r = run_cli("recipe", "validate", str(f))
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
        assert "unknown llama.cpp" in r.stderr and "did you mean" in r.stderr and hint in r.stderr


def test_imatrix_only_where_the_type_uses_it():
    from quantkit.formats import get_format

    fmt = get_format("gguf")
    opts = fmt.Options(name="g", format="gguf", types=["f16", "Q8_0", "Q4_K_M"], imatrix=True)
    vs = fmt.variants(opts)
    assert [(v.name, v.types, v.imatrix) for v in vs] == [("g-f16", ["F16"], False), ("g-q8_0", ["Q8_0"], False),
                                                          ("g-q4_k_m", ["Q4_K_M"], True)]
    assert [fmt.needs_calibration(v) for v in vs] == [False, False, True]
    assert json.dumps(vs[0].identity())  # keys are JSON
