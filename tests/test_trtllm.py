"""TensorRT-LLM target (ModelOpt unified HF checkpoints): the loader check on hand-made and real exports, the
one-line refusals, and (slow) SmolLM2 fp8 + int4_awq g64 builds whose decoded exports reproduce ModelOpt's
fake-quant perplexity."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from conftest import run_cli
from quantkit.evaluation.checks.trtllm_loader import check_checkpoint
from quantkit.store.store import Store

TRTLLM_INSTALLED = importlib.util.find_spec("tensorrt_llm") is not None

CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
       "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 32,
       "tie_word_embeddings": True, "dtype": "float32"}
SHAPES = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
          "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}


def _write(path: Path, tensors: dict, quant: dict) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(CFG))
    (path / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"}, "quantization": quant}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors")
    return path


def _fp8_tensors(kv: bool = False) -> dict:
    import torch

    t = {"model.embed_tokens.weight": torch.zeros(32, 64), "model.norm.weight": torch.ones(64)}
    for leaf, (o, i) in SHAPES.items():
        sub = "self_attn" if leaf.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
        m = f"model.layers.0.{sub}.{leaf}"
        t[f"{m}.weight"] = torch.zeros(o, i).to(torch.float8_e4m3fn)
        t[f"{m}.weight_scale"] = torch.tensor(0.01)
        t[f"{m}.input_scale"] = torch.tensor(0.02)
    if kv:
        t["model.layers.0.self_attn.k_proj.k_scale"] = torch.tensor(0.1)
        t["model.layers.0.self_attn.v_proj.v_scale"] = torch.tensor(0.1)
    return t


def _awq_tensors(group: int = 32) -> dict:
    import torch

    t = {"model.embed_tokens.weight": torch.zeros(32, 64), "model.norm.weight": torch.ones(64)}
    for leaf, (o, i) in SHAPES.items():
        sub = "self_attn" if leaf.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
        m = f"model.layers.0.{sub}.{leaf}"
        t[f"{m}.weight"] = torch.zeros(o // 2, i, dtype=torch.uint8)
        t[f"{m}.weight_scale"] = torch.ones(o, i // group)
        if leaf in ("o_proj", "down_proj"):  # q/k/v and gate/up have theirs folded into the norms
            t[f"{m}.pre_quant_scale"] = torch.ones(i)
    return t


FP8 = {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head", "model.embed_tokens"]}
AWQ = {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None, "group_size": 32, "has_zero_point": False,
       "pre_quant_scale": True, "exclude_modules": ["lm_head", "model.embed_tokens"]}
Q = "model.layers.0.self_attn.q_proj"


def test_check_accepts_well_formed_fp8_and_awq(tmp_path):
    assert check_checkpoint(_write(tmp_path / "fp8", _fp8_tensors(), FP8)) == []
    assert check_checkpoint(_write(tmp_path / "kv", _fp8_tensors(kv=True), {**FP8, "kv_cache_quant_algo": "FP8"})) == []
    assert check_checkpoint(_write(tmp_path / "awq", _awq_tensors(), AWQ)) == []


@pytest.mark.parametrize("breakage, expect", [
    (lambda t, q: t.pop(f"{Q}.weight_scale"), "q_proj.weight_scale missing"),
    (lambda t, q: t.__setitem__(f"{Q}.weight", t[f"{Q}.weight"].float()), "q_proj.weight: F32"),
    (lambda t, q: t.__setitem__(f"{Q}.weight_scale", t[f"{Q}.weight_scale"].repeat(2)), "expected one float"),
    (lambda t, q: t.pop("model.layers.0.self_attn.k_proj.input_scale"), "input_scale on some of"),
    (lambda t, q: q.__setitem__("quant_algo", "FP9"), "not a TensorRT-LLM QuantAlgo"),
    (lambda t, q: q.__setitem__("quant_algo", "W8A8_SQ_PER_CHANNEL"), "no INT8 SmoothQuant linear"),
    (lambda t, q: q.__setitem__("kv_cache_quant_algo", "FP8"), "no *.k_proj.k_scale"),
    # excluding q_proj alone: TRT-LLM quantizes the fused qkv_proj, whose q member has no scales
    (lambda t, q: q["exclude_modules"].append(Q), "differently from TRT-LLM's fused model.layers.0.self_attn.qkv_proj"),
])
def test_check_rejects_broken_fp8(tmp_path, breakage, expect):
    tensors, quant = _fp8_tensors(), json.loads(json.dumps(FP8))
    breakage(tensors, quant)
    problems = check_checkpoint(_write(tmp_path / "broken", tensors, quant))
    assert any(expect in p for p in problems), problems


@pytest.mark.parametrize("breakage, expect", [
    (lambda t, q: t.pop("model.layers.0.mlp.down_proj.pre_quant_scale"), "down_proj.pre_quant_scale missing"),
    (lambda t, q: t.__setitem__(f"{Q}.pre_quant_scale", t["model.layers.0.self_attn.o_proj.pre_quant_scale"].clone()),
     "fused q/k/v and gate/up loaders never read it"),
    (lambda t, q: t.__setitem__(f"{Q}.weight", t[f"{Q}.weight"].T.contiguous()), "q_proj.weight: U8 [64, 32]"),
    (lambda t, q: q.__setitem__("group_size", 64), "q_proj.weight_scale: F32 [64, 2]"),
    (lambda t, q: q.__setitem__("has_zero_point", True), "has_zero_point"),
])
def test_check_rejects_broken_awq(tmp_path, breakage, expect):
    tensors, quant = _awq_tensors(), json.loads(json.dumps(AWQ))
    breakage(tensors, quant)
    problems = check_checkpoint(_write(tmp_path / "broken", tensors, quant))
    assert any(expect in p for p in problems), problems


def _tiny_recipe(tmp_path: Path, model: Path, targets: str, dtype: str = "float32", calib: str = "2, seq_len: 32",
                 seq_len: int = 64) -> Path:
    f = tmp_path / "tiny-trt.yaml"
    f.write_text(f"""\
name: tiny-trt
model: {{source: {model}, dtype: {dtype}}}
calibration: {{dataset: c4, num_samples: {calib}, seed: 0}}
baseline: false
targets:
{targets}
eval: {{perplexity: {{datasets: [wikitext2], seq_len: {seq_len}, max_windows: 2}}}}
store: {{uri: {tmp_path / 'store'}}}
""")
    return f


@pytest.mark.parametrize("target, expect", [
    ("{name: sq, format: trtllm, scheme: int8_sq}", "no INT8 SmoothQuant linear"),
    ("{name: fp4, format: trtllm, scheme: nvfp4}", "no reference NVFP4 decoder"),
    ("{name: g, format: trtllm, scheme: int4_awq}", "group_size 128 does not divide in_features 64"),
])
def test_unbuildable_schemes_fail_in_one_line_without_an_artifact(tiny_llama, tmp_path, target, expect):
    recipe = _tiny_recipe(tmp_path, tiny_llama, f"  - {target}")
    name = target.split(",")[0].split()[-1]
    r = run_cli("build", str(recipe), "--target", name)
    assert r.returncode == 2 and expect in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error:")
    assert not (tmp_path / "store").exists() or list(Store(str(tmp_path / "store")).list()) == []


@pytest.mark.parametrize("scheme, expect", [("int8_sq", "no INT8 SmoothQuant linear"),
                                            ("nvfp4", "no reference NVFP4 decoder")])
def test_unusable_schemes_are_refused_by_recipe_validate(tmp_path, scheme, expect):
    recipe = _tiny_recipe(tmp_path, tmp_path, f"  - {{name: t, format: trtllm, scheme: {scheme}}}")
    r = run_cli("recipe", "validate", str(recipe))
    assert r.returncode == 2, r.stderr
    line, = r.stderr.strip().splitlines()
    assert "targets[0].scheme" in line and expect in line and "supported: fp8, int4_awq, w4a8_awq" in line, line


# --- SmolLM2-135M end to end (slow: ModelOpt calibration and three perplexity passes per target on CPU) ---

TARGETS = """\
  - {name: trt-fp8, format: trtllm, scheme: fp8}
  - {name: trt-int4-awq-g64, format: trtllm, scheme: int4_awq, group_size: 64, awq_alpha_step: 0.25}"""
# 4 windows of 512, not 8, and awq_lite's alpha grid at 5 points (the demo's; default 11), for CI's 2 cores
# (issue 13): each model here is scored 2-3 times (baseline, fake-quant, decoded export), so windows are most of
# this build's cost. The bounds below hold with room on 4: the demo recipe's run of the same two targets (16 x 256
# calibration, step 0.25; per-window NLLs), first 4 of 8 windows: FP8 +2.66 % (bound 0..5 %; per window
# -0.002..+0.047 nats against the baseline), INT4-AWQ +30.1 % (bound 50 %). The decoded-export agreement (0.1 %)
# compares two scorings of the same windows, whatever their number.
WINDOWS = 4


@pytest.fixture(scope="module")
def smol_built(smollm2, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trtllm")
    recipe = tmp / "smol-trt.yaml"
    recipe.write_text(f"""\
name: smol-trt
model: {{source: {smollm2}, dtype: float32}}
calibration: {{dataset: c4, num_samples: 8, seq_len: 256, seed: 0}}
targets:
{TARGETS}
eval: {{perplexity: {{datasets: [wikitext2], seq_len: 512, max_windows: {WINDOWS}}}}}
store: {{uri: {tmp / 'store'}}}
""")
    r = run_cli("build", str(recipe), "--json", "--report-dir", str(tmp / "rep"))
    assert r.returncode == 0, r.stderr[-3000:]
    store = Store(str(tmp / "store"))
    manifests = {m["target"]["name"]: m for m in store.list()}
    dirs = {n: store.materialize(m["id"], tmp / "pulled" / n) for n, m in manifests.items() if m["files"]}
    return {row["target"]: row for row in json.loads(r.stdout)["rows"]}, manifests, dirs


@pytest.mark.slow
def test_smollm2_exports_match_fake_quant_and_fp8_is_near_baseline(smol_built):
    rows, manifests, _ = smol_built
    for name, algo in (("trt-fp8", "FP8"), ("trt-int4-awq-g64", "W4A16_AWQ")):
        m = manifests[name]
        info = m["info"]
        assert m["engine"] == "modelopt-dequant" and info["quant_algo"] == algo
        assert info["hf_quant_config"]["quantization"]["quant_algo"] == algo
        checks = m["checks"]  # run by the evaluation layer, declared by the format
        assert checks["trtllm-loader"]["status"] == "passed"
        # the real TensorRT-LLM, when installed, loads the export and generates (the build fails otherwise)
        if TRTLLM_INSTALLED:
            assert checks["trtllm-load"]["summary"].startswith("loaded by tensorrt_llm.LLM"), checks["trtllm-load"]
        else:
            assert checks["trtllm-load"]["status"] == "not run"
        # the decoded export reproduces ModelOpt's fake-quant model on the build's own windows
        agree = checks["perplexity-agrees"]
        assert agree["expected_ppl"] == info["fake_quant"]["ppl"] and agree["engine"] == "modelopt-dequant"
        # scored with the exporter's FP8 arithmetic, the two agree to rounding noise (the demo model's Q4_1-grid
        # weights flipped E4M3 ties under ModelOpt's eager scale direction: +1% before that fix)
        assert abs(agree["ppl"] / info["fake_quant"]["ppl"] - 1) <= 0.001, agree
        assert m["metrics"]["perplexity"]["wikitext2"]["ppl"] == pytest.approx(agree["ppl"], rel=1e-3)
        assert m["total_size"] < rows["baseline"]["size_mb"] * 1e6 * 0.5
    assert manifests["trt-int4-awq-g64"]["info"]["hf_quant_config"]["quantization"]["group_size"] == 64
    assert 0 <= rows["trt-fp8"]["ppl"]["wikitext2"]["change_pct"] < 5.0, rows["trt-fp8"]
    assert rows["trt-int4-awq-g64"]["ppl"]["wikitext2"]["change_pct"] < 50.0  # 4-bit on a 135M model: sane


@pytest.mark.slow
def test_loader_check_passes_real_exports_and_fails_broken_copies(smol_built, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    _, _, dirs = smol_built
    for name, d in dirs.items():
        assert check_checkpoint(d) == [], name
        tensors = load_file(d / "model.safetensors")
        for label, breakage in (
            ("missing weight_scale", lambda t: t.pop("model.layers.3.mlp.down_proj.weight_scale")),
            ("bf16 weight", lambda t: t.__setitem__("model.layers.3.mlp.down_proj.weight",
                                                    t["model.layers.3.mlp.down_proj.weight"].to(torch.bfloat16))),
        ):
            broken = tmp_path / f"{name}-{label.replace(' ', '-')}"
            shutil.copytree(d, broken, ignore=shutil.ignore_patterns("model.safetensors"))
            t = dict(tensors)
            breakage(t)
            save_file(t, broken / "model.safetensors")
            problems = check_checkpoint(broken)
            assert any("model.layers.3.mlp.down_proj.weight" in p for p in problems), (name, label, problems)


@pytest.mark.slow
@pytest.mark.skipif(not TRTLLM_INSTALLED, reason="tensorrt_llm not installed (needs a CUDA host): the real "
                    "loader cannot run here; the static loader check above stands in")
def test_real_tensorrt_llm_loads_and_generates_from_exports(smol_built):
    from tensorrt_llm import LLM, SamplingParams

    _, _, dirs = smol_built
    for name, d in dirs.items():
        llm = LLM(model=str(d))
        out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8))
        assert out[0].outputs[0].text.strip(), name
        del llm


@pytest.mark.parametrize("kind", ["awq", "fp8-kv"])
def test_reference_model_moves_its_scales_with_the_weights(tmp_path, kind):
    """The decoded reference model's input/KV scales travel with `model.to(device)`. On the H200 (run 4) the
    INT4-AWQ export check failed with "cuda:0 and cpu": the 1-D pre_quant_scale stayed on the CPU. The meta
    device stands in for the GPU here: it refuses CPU operands the same way."""
    import torch

    from quantkit.evaluation.engines.modelopt_reference import build_reference_model

    tensors = _awq_tensors() if kind == "awq" else _fp8_tensors(kv=True)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        tensors[f"model.layers.0.{norm}.weight"] = torch.ones(64)
    path = _write(tmp_path / kind, tensors, AWQ if kind == "awq" else {**FP8, "kv_cache_quant_algo": "FP8"})
    model, _ = build_reference_model(path, torch.float32)
    ids = torch.tensor([[1, 2, 3]])
    cpu_logits = model(input_ids=ids).logits
    assert torch.isfinite(cpu_logits).all()
    names = [n for n, _ in model.named_buffers() if "_quantkit_" in n]
    assert len(names) == (2 if kind == "awq" else 9), names  # awq: o/down pre_quant_scale; fp8: 7 inputs + k/v
    model.to("meta")
    assert {model.get_buffer(n).device.type for n in names} == {"meta"}
    assert model(input_ids=ids.to("meta")).logits.shape == cpu_logits.shape


@pytest.mark.slow
def test_a_bf16_fp8_export_agrees_with_its_fake_quant_on_the_cpu(smollm2, tmp_path):
    """A bf16 model on the CPU (the H200 demo recipe rehearsed here): the exporter divides bf16 weights by a 0-dim
    float32 scale in bf16 (rounded twice on the way to FP8) and the engines score in float32 on the CPU. Before
    both were mirrored in the fake-quant scoring the check read -0.64 % (over its 0.5 %) on 2 windows."""
    recipe = _tiny_recipe(tmp_path, smollm2, "  - {name: trt-fp8, format: trtllm, scheme: fp8}", dtype="bfloat16",
                          calib="4, seq_len: 64", seq_len=512)
    r = run_cli("build", str(recipe), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    (m,) = Store(str(tmp_path / "store")).list()
    agree = m["checks"]["perplexity-agrees"]
    assert agree["engine"] == "modelopt-dequant" and agree["expected_ppl"] == m["info"]["fake_quant"]["ppl"]
    assert abs(agree["ppl"] / m["info"]["fake_quant"]["ppl"] - 1) <= 1e-4, agree


_PEAK_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from quantkit.evaluation.engines.modelopt_reference import build_reference_model

def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024

build_reference_model(Path(sys.argv[1]), torch.float32)  # imports and first-use allocations, not measured
import gc; gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
before = hwm()
model, _ = build_reference_model(Path(sys.argv[2]), torch.float32)
print(json.dumps({"growth": hwm() - before, "model": sum(p.numel() * 4 for p in model.parameters())}))
"""


def test_reference_model_of_an_export_is_one_copy_in_memory(tmp_path):
    """The decoded reference model is filled tensor by tensor from the memory-mapped export, on the device it
    runs on: on the CPU peak memory grows by one dense copy of the model plus the export's pages. Loading the
    whole export first held the packed tensors, their decoded dict and the model at once (9.5 GB of host for the
    3.85 GB 8B x 4 export on the H200, run 6, where the model then went to the GPU)."""
    import subprocess
    import sys

    import torch

    small = _awq_tensors()
    for norm in ("input_layernorm", "post_attention_layernorm"):
        small[f"model.layers.0.{norm}.weight"] = torch.ones(64)
    small = _write(tmp_path / "small", small, AWQ)
    hidden, inter, layers = 512, 2048, 8
    cfg = {**CFG, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
           "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 256}
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden // 2, hidden), "v_proj": (hidden // 2, hidden),
              "o_proj": (hidden, hidden), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
              "down_proj": (hidden, inter)}
    g = torch.Generator().manual_seed(0)
    t = {"model.embed_tokens.weight": torch.randn(256, hidden, generator=g), "model.norm.weight": torch.ones(hidden)}
    for n in range(layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            t[f"model.layers.{n}.{norm}.weight"] = torch.ones(hidden)
        for leaf, (o, i) in shapes.items():
            m = f"model.layers.{n}.{'self_attn' if leaf.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{leaf}"
            t[f"{m}.weight"] = torch.randint(0, 256, (o // 2, i), dtype=torch.uint8, generator=g)
            t[f"{m}.weight_scale"] = torch.rand(o, i // 32, generator=g) / 10
            if leaf in ("o_proj", "down_proj"):
                t[f"{m}.pre_quant_scale"] = torch.ones(i)
    big = _write(tmp_path / "big", t, AWQ)
    (big / "config.json").write_text(json.dumps(cfg))
    del t
    r = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(small), str(big)], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["model"] > 100e6, m  # big enough that a second copy shows
    # measured: 1.60 x (the model, the export's mapped pages, allocator slack); the whole-dict load: 2.28 x
    assert m["growth"] <= 1.9 * m["model"], m
