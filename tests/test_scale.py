"""Builds that scale (issue 10), on the CPU: placement decisions, dummy weights, disk offload, the distributed
launcher (gloo, 2 ranks), the build planner offline, and a bounded-memory regression test that fails if a
whole-model copy per target comes back."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli
from quantkit.errors import UserError
from quantkit.placement import Host, decide, whole_model_device_map
from quantkit.recipe.schema import ModelSpec

GB = 1e9
CPU_HOST = Host(cuda_devices=0, gpu_name=None, gpu_bytes=0, host_available=32 * GB)
GPU_HOST = Host(cuda_devices=2, gpu_name="NVIDIA H200", gpu_bytes=141 * GB, host_available=128 * GB)


@pytest.fixture(autouse=True)
def dummy_tokenizer(tiny_llama, monkeypatch):
    """Dummy weights take their tokenizer from QUANTKIT_DEMO_MODEL (else the demo model's): the tiny one here, so
    these tests need no `make model` (`make check` on a fresh clone); subprocesses inherit the variable."""
    monkeypatch.setenv("QUANTKIT_DEMO_MODEL", str(tiny_llama))


def spec(**kw) -> ModelSpec:
    return ModelSpec(source="org/model", revision="x", **kw)


# ---------------------------------------------------------------- placement rules (pure)

def test_weights_stay_in_host_ram_when_they_fit_and_go_to_disk_when_not(tmp_path):
    p = decide(spec(), 16 * GB, GPU_HOST)
    assert (p.weights, p.compute, p.gpus) == ("cpu", "cuda:0 (NVIDIA H200)", 1)
    assert "one decoder layer at a time on cuda:0" in p.describe()
    big = decide(spec(offload_dir=str(tmp_path)), 141 * GB, GPU_HOST)  # 70B bf16 on a 128 GB host
    assert big.weights == "disk" and big.offload_dir == str(tmp_path) and big.notes
    assert decide(spec(), 141 * GB, GPU_HOST).offload_dir  # auto without a dir: the cache's disk
    assert decide(spec(offload="cpu"), 8 * GB, CPU_HOST).describe().endswith("computed on the CPU (no CUDA device)")


def test_gpu_count_and_offload_errors_are_one_line(tmp_path):
    assert decide(spec(gpus="auto"), GB, GPU_HOST).gpus == 2
    assert decide(spec(gpus="auto"), GB, CPU_HOST).gpus == 1
    with pytest.raises(UserError, match=r"model.gpus: 4 GPUs asked for, 2 present"):
        decide(spec(gpus=4), GB, GPU_HOST)
    with pytest.raises(UserError, match=r"model.gpus: 2 GPUs asked for, 0 present"):
        decide(spec(gpus=2), GB, CPU_HOST)
    with pytest.raises(UserError, match="offload: disk needs a writable offload_dir"):
        decide(spec(offload="disk"), GB, CPU_HOST)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="is not a writable directory"):
        decide(spec(offload="disk", offload_dir=str(blocker / "sub")), GB, CPU_HOST)
    with pytest.raises(UserError, match="offload: none puts 200.0 GB"):
        decide(spec(offload="none"), 200 * GB, GPU_HOST)


def test_whole_model_forward_passes_go_to_the_gpu_or_spread_over_gpu_and_host():
    assert whole_model_device_map(10 * GB, CPU_HOST) == (None, "cpu")
    assert whole_model_device_map(10 * GB, GPU_HOST)[0] == {"": 0}
    dm, where = whole_model_device_map(141 * GB, GPU_HOST)
    assert dm == "auto" and "host RAM" in where


# ---------------------------------------------------------------- dummy weights, bad input through the CLI

def _tiny_config(tmp: Path, hidden=64, inter=128, layers=2) -> Path:
    cfg = json.loads((ROOT / "quantkit/data/architectures/smollm2-135m.json").read_text())
    cfg.update(hidden_size=hidden, intermediate_size=inter, num_attention_heads=4, num_key_value_heads=2,
               head_dim=hidden // 4, num_hidden_layers=layers)
    p = tmp / f"arch-{hidden}-{inter}.json"
    p.write_text(json.dumps(cfg))
    return p


def _recipe(tmp: Path, model: str, targets: str, name: str = "scale", calib: str = "{num_samples: 4, seq_len: 64}",
            eval_: str = "{perplexity: null}") -> Path:
    p = tmp / f"{name}.yaml"
    p.write_text(f"name: {name}\nmodel: {model}\ncalibration: {calib}\ntargets:\n{targets}\neval: {eval_}\n"
                 f"store: {{uri: {tmp / 'store'}}}\n")
    return p


def _one_line_exit_2(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def test_bad_scale_inputs_fail_in_one_line(tmp_path):
    fp8 = "  - {name: fp8, format: fp8}"
    r = run_cli("build", str(_recipe(tmp_path, '{source: "dummy:no-such-arch"}', fp8)))
    _one_line_exit_2(r, "dummy config 'no-such-arch'", "llama-3.1-70b")
    cfg = _tiny_config(tmp_path)
    r = run_cli("build", str(_recipe(tmp_path, f'{{source: "dummy:{cfg}", offload: disk}}', fp8)))
    _one_line_exit_2(r, "offload: disk needs a writable offload_dir")
    r = run_cli("build", str(_recipe(tmp_path, f'{{source: "dummy:{cfg}", gpus: 3}}', fp8)))
    _one_line_exit_2(r, "model.gpus: 3 GPUs asked for, 0 present")
    r = run_cli("recipe", "validate", str(_recipe(tmp_path, f"{{source: {ROOT / 'models'}, layers: 2}}", fp8)))
    _one_line_exit_2(r, "layers applies to dummy sources only")


def test_dummy_weights_have_real_shapes_are_marked_and_get_no_perplexity(tmp_path):
    cfg = _tiny_config(tmp_path)
    recipe = _recipe(tmp_path, f'{{source: "dummy:{cfg}", layers: 3, dtype: float32}}',
                     "  - {name: fp8-dynamic, format: fp8, scheme: dynamic}",
                     eval_="{perplexity: {datasets: [wikitext2], seq_len: 64, max_windows: 2}}")
    r = run_cli("build", str(recipe), "--json", "--report-dir", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr[-3000:]
    manifests = _manifests(tmp_path)
    for m in manifests:
        assert m["source"]["weights"] == "dummy" and m["source"]["kind"] == "dummy"
        assert "perplexity" not in m["metrics"]  # random weights: nothing to measure
    fp8 = next(m for m in manifests if m["target"]["name"] == "fp8-dynamic")
    assert "model-free" in fp8["build"]["devices"]["quantize"] and "cpu" in fp8["build"]["devices"]["quantize"]
    from quantkit.sources.dummy import resolve_dummy

    src = resolve_dummy(ModelSpec(source=f"dummy:{cfg}", layers=3, dtype="float32"))
    from safetensors import safe_open

    with safe_open(next(src.path.glob("*.safetensors")), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.2.mlp.down_proj.weight").shape == (64, 128)
        assert torch.equal(f.get_tensor("model.layers.0.input_layernorm.weight"), torch.ones(64))
        assert 0.015 < f.get_tensor("model.layers.1.self_attn.q_proj.weight").std() < 0.025
    assert "model.layers.3.mlp.up_proj.weight" not in names and "lm_head.weight" not in names  # tied
    with safe_open(next(fp8_dir(tmp_path, fp8).glob("*.safetensors")), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32  # embeddings never quantized


def _manifests(tmp: Path) -> list[dict]:
    from quantkit.store.store import Store

    return list(Store(str(tmp / "store")).list())


def fp8_dir(tmp: Path, manifest: dict) -> Path:
    from quantkit.store.store import Store

    return Store(str(tmp / "store")).materialize(manifest["id"], tmp / "pulled")


def test_disk_offload_builds_a_calibrated_target(tmp_path):
    cfg = _tiny_config(tmp_path)
    off = tmp_path / "offload"
    recipe = _recipe(tmp_path, f'{{source: "dummy:{cfg}", dtype: float32, offload: disk, offload_dir: {off}}}',
                     "  - {name: gptq, format: gptq, group_size: 32}")
    r = run_cli("build", str(recipe), "--json", "--report-dir", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr[-3000:]
    m = next(m for m in _manifests(tmp_path) if m["target"]["name"] == "gptq")
    assert "weights offloaded to disk" in m["build"]["devices"]["calibration"]
    assert m["info"]["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert off.is_dir() and not any(off.iterdir())  # the per-target folder went with the model


# ---------------------------------------------------------------- several processes (gloo on the CPU)

@pytest.mark.slow  # two GPTQ builds, one of them launching two rank processes that each import torch
def test_two_ranks_give_the_one_process_result(tmp_path):
    """`quantkit build` with model.gpus: 2 (quantkit's launcher, 2 ranks of llm-compressor's distributed
    oneshot; gloo CPU processes stand in for the GPUs) against model.gpus: 1 (one process, no
    torch.distributed): the same GPTQ checkpoint, bit for bit. What this catches, measured: every rank
    calibrating on the same first half of the set (llm-compressor's own split; 25% of the codes differ, layer 0
    included), ranks propagating through layers another rank has not finished writing (no barrier; 7%, layers
    1-2 up to 21%), and float32 Hessians, whose sums depend on the order of the samples (0.36% of the codes
    here; 16% on the 30-layer demo model)."""
    from quantkit.formats.layouts.compressed_tensors import dequantize, read_compressed_tensors
    from quantkit.store.store import Store

    cfg = _tiny_config(tmp_path, 128, 256, layers=3)
    layers = {}
    for gpus in (1, 2):
        recipe = _recipe(tmp_path, f'{{source: "dummy:{cfg}", dtype: float32, gpus: {gpus}}}',
                         "  - {name: g, format: gptq, group_size: 32}", name=f"g{gpus}",
                         calib="{num_samples: 8, seq_len: 64}")
        recipe.write_text(recipe.read_text().replace(str(tmp_path / "store"), str(tmp_path / f"store{gpus}")))
        r = run_cli("build", str(recipe), env={"QUANTKIT_CPU_RANKS": "2"})
        assert r.returncode == 0, r.stderr[-3000:]
        st = Store(str(tmp_path / f"store{gpus}"))
        (m,) = [m for m in st.list() if m["target"]["name"] == "g"]
        if gpus == 2:  # the ranks were started with the build, before the calibration set (their imports overlap)
            assert "2 processes (torch.distributed, gloo, started with the build)" in m["build"]["devices"]["calibration"]
            ranks = m["build"]["devices"]["ranks"]
            assert "samples 4 of 8 (rows 0-3)" in ranks and "samples 4 of 8 (rows 4-7)" in ranks, ranks
            # each rank says where its start-up went (imports, process group, source + calibration set)
            assert ranks.count("start-up ") == 2 and "(imports " in ranks and "process group " in ranks, ranks
        layers[gpus] = read_compressed_tensors(st.materialize(m["id"], tmp_path / f"out{gpus}"))[0]
    assert sorted(layers[1]) == sorted(layers[2]) and len(layers[1]) == 21
    differing = total = 0
    worst = 0.0
    for name, one in layers[1].items():
        two = layers[2][name]
        assert torch.equal(one.scale, two.scale), name
        differing += int((one.q != two.q).sum())
        total += one.q.numel()
        a, b = dequantize(one), dequantize(two)
        worst = max(worst, float((a - b).norm() / a.norm()))
    assert differing == 0 and worst == 0, (differing, total, worst)


def test_ranks_started_with_a_build_that_fails_before_using_them_are_stopped(tmp_path):
    """Ranks start with the build (quantkit/distributed.py, Ranks); AWQ over CPU ranks is then refused in one line
    (each rank would rescale the weights all share): the waiting ranks must not outlive the build."""
    import psutil

    cfg = _tiny_config(tmp_path, 128, 256, layers=2)
    recipe = _recipe(tmp_path, f'{{source: "dummy:{cfg}", dtype: float32, gpus: 2}}',
                     "  - {name: a, format: awq, group_size: 32}", name="a2", calib="{num_samples: 4, seq_len: 32}")
    r = run_cli("build", str(recipe), env={"QUANTKIT_CPU_RANKS": "2"})
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "AWQModifier over CPU ranks" in last and "model.gpus: 1" in last, last
    left = [p for p in psutil.process_iter(["cmdline"]) if "quantkit.distributed" in " ".join(p.info["cmdline"] or [])
            and "ranks-early" in " ".join(p.info["cmdline"] or [])]
    assert not left, [p.info["cmdline"] for p in left]


# ---------------------------------------------------------------- the build planner, offline

@pytest.mark.parametrize("recipe", ["recipes/llama70b-awq.yaml", "recipes/llama8b-all.yaml"])
def test_plan_builds_offline_for_one_h200_and_eight_h100(recipe):
    for gpu, gpus, ram in (("H200", 1, "128GB"), ("H100-80GB", 8, "1TB")):
        r = run_cli("plan", recipe, "--gpu", gpu, "--gpus", str(gpus), "--host-ram", ram, "--json")
        assert r.returncode == 0, r.stderr[-2000:]
        build = json.loads(r.stdout)["build"]
        assert build and all(b["fits"] and b["minutes"] > 0 for b in build)
        awq = next(b for b in build if b["algorithm"] == "awq")
        assert awq["how"] == "layerwise" and 0 < awq["gpu_gb"] < (141 if gpu == "H200" else 80)
        if "70b" in recipe and gpus == 1:
            assert awq["weights"] == "disk (offloaded)"  # 141 GB of bf16 weights > 128 GB of host RAM


def test_plan_refuses_in_one_line_when_a_target_cannot_fit():
    r = run_cli("plan", "recipes/llama70b-awq.yaml", "--gpu", "RTX4090", "--host-ram", "8GB")
    _one_line_exit_2(r, "cannot be built here", "host RAM")


@pytest.mark.parametrize("device, key", [("NVIDIA H200", "H200-141GB"), ("NVIDIA H100 80GB HBM3", "H100-80GB"),
                                         ("NVIDIA A100-SXM4-40GB", "A100-40GB"), ("NVIDIA GeForce RTX 4090",
                                                                                  "RTX4090-24GB")])
def test_a_cuda_device_name_maps_to_its_gpus_yaml_row(device, key):
    from quantkit.planner import gpu_key_for_device

    assert gpu_key_for_device(device) == key


def test_a_gpu_build_estimates_its_time_with_the_build_planner_not_two_cpu_cores():
    """H200 run 5: the console said "estimated 674 min 06 s on 2 CPU cores" for a 72 s GPTQ build of 8B x 8 layers."""
    from quantkit.build_plan import plan_recipe
    from quantkit.formats import get_format
    from quantkit.planner import recipe_config
    from quantkit.progress import gpu_produce_estimates
    from quantkit.recipe.loader import load_recipe

    loaded = load_recipe(ROOT / "recipes/llama8b-all.yaml")
    config = recipe_config(loaded.recipe.model, loaded.path.parent)
    h200 = Host(1, "NVIDIA H200", 141e9, 128e9)
    seconds, label = gpu_produce_estimates(loaded, config, h200)
    assert label == "on 1 x H200-141GB (build planner)"
    planned = {n.target: n.minutes * 60 for n in plan_recipe(loaded, config, "H200-141GB", 1, 128e9)}
    assert seconds["gptq-w4-g128"] == planned["gptq-w4-g128"]
    gptq = next(t for t in loaded.targets if t.name == "gptq-w4-g128")
    cpu = get_format("gptq").estimate_s(gptq, params=8.0e9, calib_tokens=128 * 2048, pass_tokens=0)
    assert 60 < seconds["gptq-w4-g128"] < 1800 < cpu  # minutes on the H200, not the CPU's hours
    assert gpu_produce_estimates(loaded, config, Host(0, None, 0, 128e9)) is None  # no CUDA: the CPU estimate
    assert gpu_produce_estimates(loaded, config, Host(1, "NVIDIA B9000", 1e11, 128e9)) is None  # not in gpus.yaml
# ---------------------------------------------------------------- bounded memory (the regression test)

TARGETS = """\
  - {name: fp8-dynamic, format: fp8, scheme: dynamic}
  - {name: w8a16-rtn, format: int8, scheme: w8a16, algorithm: rtn}
  - {name: gptq-w4, format: gptq, bits: 4, group_size: 32}"""


def _peak(recipe: Path) -> dict:
    r = subprocess.run([sys.executable, str(ROOT / "scripts/build_peak.py"), "build", str(recipe)],
                       capture_output=True, text=True, cwd=ROOT)
    rec = json.loads(r.stderr.strip().splitlines()[-1])
    assert rec["exit"] == 0, r.stderr[-3000:]
    return rec


@pytest.mark.slow  # two builds in fresh processes, one of them GPTQ on a ~150 MB model
def test_peak_rss_of_a_three_target_build_is_one_copy_of_the_model(tmp_path):
    """Peak RSS (VmHWM) of a build of 3 targets (model-free FP8 and W8A16, GPTQ W4) on a ~150 MB fp32 model,
    above the same build on a ~0 MB model (interpreter, torch, transformers, llm-compressor: the fixed
    overhead, measured here, not assumed), less one layer's GPTQ Hessians (float64 since a903e16, see
    quantkit/distributed.py; the planner counts them too: 31.5 MB here, a fifth of this 4-layer model).
    Measured, 2026-11-30: 1.77-1.81 x the model's bytes with the Hessians, 1.56-1.60 x without them (the
    memory-mapped source pages plus GPTQ's copy-on-write updates of them; the ~0 MB run alone varies by 12 MB),
    short of the issue's 1.3 x, which is asked of a model of a few GB (scripts/bench_scale.py), where one
    layer is a small part of the model. A deep copy per target, as the build once made, adds a whole copy
    (>= 2.5 x), which this fails on."""
    from quantkit.sources.dummy import resolve_dummy

    calib = "{num_samples: 8, seq_len: 128}"
    runs = {}
    for label, hidden, inter, layers in (("tiny", 64, 128, 1), ("big", 512, 1536, 4)):
        cfg = _tiny_config(tmp_path, hidden, inter, layers)
        src = resolve_dummy(ModelSpec(source=f"dummy:{cfg}", dtype="float32"))  # drawn here, not in the build
        recipe = _recipe(tmp_path, f"{{source: {src.path}, dtype: float32}}", TARGETS, name=label, calib=calib)
        runs[label] = (_peak(recipe)["vmhwm"], sum(f.stat().st_size for f in src.path.glob("*.safetensors")))
    (tiny_peak, _), (big_peak, model_bytes) = runs["tiny"], runs["big"]
    calib_bytes = 8 * 128 * 8 * 2  # int64 ids, as tensor and as dataset
    hessian_bytes = 8 * (6 * 512 ** 2 + 1536 ** 2)  # one layer's: q, k, v, o, gate, up see 512 columns, down 1536
    assert model_bytes > 140e6
    over = big_peak - tiny_peak - hessian_bytes - calib_bytes
    assert over <= 1.8 * model_bytes, (over / model_bytes, big_peak, tiny_peak, model_bytes)


CALIBRATED = """\
  - {name: fp8-static, format: fp8, scheme: static}
  - {name: int8-w8a8, format: int8, scheme: w8a8}
  - {name: gptq-w4, format: gptq, bits: 4, group_size: 32}
  - {name: awq-w4, format: awq, group_size: 32, n_grid: 3}"""


def test_no_calibrated_target_model_outlives_its_target(tiny_llama, tmp_path, monkeypatch):
    """Every model a target reads (llm-compressor's sequential pipeline: static FP8, SmoothQuant + GPTQ W8A8,
    GPTQ, AWQ) is gone, with its Linear modules, when its target has finished, in this very process. What it
    catches, measured: each calibrated target's model kept for good by torch.fx's wrap registry (llm-compressor
    traces each forward in a globals copy holding `self`), one fp32 copy per target: the demo build grew from
    0.57 to 3.59 GB over five of them. The loads are real; they are only watched (weak references)."""
    import gc
    import weakref

    from quantkit.build import run_build
    from quantkit.context import BuildContext
    from quantkit.recipe.loader import load_recipe

    loads: list[tuple[weakref.ref, weakref.ref]] = []
    real_load = BuildContext.load_model

    def watched_load(self, purpose="layerwise"):
        model = real_load(self, purpose)
        linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        loads.append((weakref.ref(model), weakref.ref(linear)))
        return model

    monkeypatch.setattr(BuildContext, "load_model", watched_load)
    survivors: dict[str, int] = {}

    class Watch:  # the orchestrator's progress hook: called once each target is done
        def planned(self, *_):
            pass

        def finished(self, manifest):
            gc.collect()
            survivors[manifest["target"]["name"]] = sum(m() is not None or lin() is not None for m, lin in loads)

    recipe = _recipe(tmp_path, f"{{source: {tiny_llama}, dtype: float32}}", CALIBRATED,
                     calib="{num_samples: 4, seq_len: 64}")
    recipe.write_text(recipe.read_text() + "baseline: false\n")
    run_build(load_recipe(recipe), progress=Watch())
    assert len(loads) == 4, loads
    assert survivors == {"fp8-static": 0, "int8-w8a8": 0, "gptq-w4": 0, "awq-w4": 0}, survivors


def test_model_free_frees_each_input_once_quantized_and_writes_the_same_checkpoint(tiny_llama, tmp_path,
                                                                                     monkeypatch):
    """`quantkit.pread.shard_inputs_released` (model-free under 0.3 x the model, docs/benchmarks/cpu-scale): while
    llm-compressor quantizes a shard's tensors one by one, the inputs it already quantized are freed (before,
    the caller's dict held every input of the shard until the shard was done), and the checkpoint is byte for
    byte what llm-compressor writes alone."""
    import weakref

    import llmcompressor.entrypoints.model_free.converter as conv
    from llmcompressor import model_free_ptq
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from quantkit.pread import pread_checkpoints, shard_inputs_released

    cfg = QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC",
                               ignore=["lm_head", "re:.*embed_tokens"]).resolve_quantization_config()
    done: list = []  # weak references to the inputs quantized so far
    still_alive: list[int] = []  # at each tensor's quantization: how many of the earlier inputs are alive
    initialize = conv.initialize_quantized_linear

    def watched(weight, *a, **kw):
        still_alive.append(sum(ref() is not None for ref in done))
        done.append(weakref.ref(weight))
        return initialize(weight, *a, **kw)

    monkeypatch.setattr(conv, "initialize_quantized_linear", watched)
    outs, alive = {}, {}
    for name, released in (("plain", False), ("released", True)):
        done.clear()
        still_alive.clear()
        with pread_checkpoints(), (shard_inputs_released() if released else contextlib.nullcontext()):
            model_free_ptq(str(tiny_llama), str(tmp_path / name), config=cfg, device="cpu", max_workers=1)
        outs[name] = {p.name: p.read_bytes() for p in (tmp_path / name).glob("*.safetensors")}
        alive[name] = list(still_alive)
    n = len(alive["plain"])
    # every earlier input of the shard held until the shard ends (the counts restart with each shard)
    assert n > 4 and alive["plain"][:7] == list(range(7)), alive
    assert alive["released"] == [0] * n, alive  # each freed once quantized
    assert outs["released"] == outs["plain"] and outs["plain"]
    assert conv.split_fused_moe_experts.__name__ == "split_fused_moe_experts"  # put back after the call
