"""The llama.cpp engine's scoring in a child process without torch (quantkit/toolchain/llama_cpp_scorer.py): on a
GPU host the binding over a CUDA build segfaults beside torch (docs/benchmarks/h200-x2/README.md), so there the
engine scores in a child. Here (CPU build) both paths run: the child must give the in-process numbers and must
not have torch loaded."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest



@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, smollm2):
    """2 random layers of width 64 under the demo model's tokenizer (a BPE vocabulary llama.cpp's converter knows)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantkit.toolchain.llama_cpp import convert_script

    d = tmp_path_factory.mktemp("scorer")
    model = d / "hf"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, max_position_embeddings=512)
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(model)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2 / f, model / f)
    out = d / "tiny-f16.gguf"
    p = subprocess.run([sys.executable, str(convert_script()), str(model), "--outtype", "f16", "--outfile", str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    return out


def test_child_scores_like_this_process_and_loads_no_torch(tiny_gguf, monkeypatch):
    from quantkit.evaluation.engines.llama_cpp_engine import LlamaCppEngine

    assert "torch" in sys.modules  # the parent is the process the crash needs
    ids = np.random.default_rng(0).integers(3, 49000, size=(3, 48))
    results = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("QUANTKIT_LLAMA_CPP_CHILD", mode)
        eng = LlamaCppEngine()
        handle = eng.load(tiny_gguf.parent, tiny_gguf.name)
        results[mode] = eng.nll(handle, ids, label="test")
        scorer = handle.scorers[48]
        assert type(scorer).__name__ == ("ChildScorer" if mode == "1" else "InProcessScorer")
        if mode == "1":
            assert scorer.torch_in_child is False
            assert scorer.proc.poll() is None  # one child per context, kept for the next windows
        handle.close()
        if mode == "1":
            assert scorer.proc.returncode == 0
    (t0, c0), (t1, c1) = results["0"], results["1"]
    assert c0 == c1 == 3 * 47
    assert t1 == pytest.approx(t0, rel=1e-9)
    assert 1000 < np.exp(t0 / c0) < 1e6  # finite, near the vocabulary size: a random model


def test_a_child_killed_by_a_signal_with_the_model_on_the_gpu_is_rescored_on_the_cpu(tiny_gguf, capfd):
    """H200 run 5: the GPU child died of SIGSEGV. Here the child is killed with SIGSEGV for real; the scorer must start
    a CPU child (GPUs hidden), score the same row again to the same NLL, say so, and label the device."""
    import os
    import signal

    from quantkit.toolchain.llama_cpp_scorer import ChildScorer

    row = np.random.default_rng(1).integers(3, 49000, size=40).tolist()
    ref = ChildScorer(tiny_gguf, 40, 2, 0)
    expected = ref.score(row)
    ref.close()
    assert ref.device == "cpu" and ref.fallback_reason is None

    s = ChildScorer(tiny_gguf, 40, 2, 99)  # a CPU build keeps the layers on the CPU whatever -ngl says
    assert s.device == "cuda"
    first = s.proc
    os.kill(first.pid, signal.SIGSEGV)
    first.wait(timeout=30)
    assert s.score(row) == pytest.approx(expected, rel=1e-9)
    assert s.device == "cpu" and s.proc is not first
    assert s.fallback_reason == f"the scoring process died of signal {int(signal.SIGSEGV)} with the model on the GPU"
    assert "scoring on the CPU instead" in capfd.readouterr().err
    assert s.score(row) == pytest.approx(expected, rel=1e-9)  # the CPU child stays for the next rows
    s.close()
    assert s.proc.returncode == 0

    cpu = ChildScorer(tiny_gguf, 40, 2, 0)  # on the CPU already: a crash is an error, not a retry
    os.kill(cpu.proc.pid, signal.SIGSEGV)
    cpu.proc.wait(timeout=30)
    with pytest.raises(RuntimeError, match="exited -11"):
        cpu.score(row)


# --- where the engine runs: a CUDA build alone is not a GPU (H200 run 6: CUDA_VISIBLE_DEVICES= with the CUDA build;
# llama.cpp said "no CUDA-capable device is detected" and ran on the CPU while the records said cuda)

def _cuda_build_without_gpu(monkeypatch, hidden: str | None = "") -> None:
    """This host's CPU build stands in for a CUDA build (the cache-key lookup is the only thing faked); GPUs hidden."""
    from quantkit.toolchain import llama_cpp

    monkeypatch.setattr(llama_cpp, "backend_of", lambda path: "cuda")
    if hidden is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)


@pytest.mark.parametrize("hidden", ["", "-1", "  "])
def test_no_cuda_device_visible_when_the_gpus_are_hidden(monkeypatch, hidden):
    from quantkit.toolchain.llama_cpp import cuda_device_visible

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
    assert cuda_device_visible() is False


def test_no_cuda_device_visible_on_this_cpu_host_with_torch_imported(monkeypatch):
    import torch

    from quantkit.toolchain.llama_cpp import cuda_device_visible

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert not torch.cuda.is_available()  # the premise: this test host has no GPU
    assert cuda_device_visible() is False


def test_without_torch_the_helper_asks_nvidia_smi_and_never_imports_torch(tmp_path):
    """A fresh interpreter (no torch): `nvidia-smi -L` decides. A stand-in nvidia-smi on PATH prints what the real one
    prints on the H200 host; hidden GPUs still win over it; none on PATH means no device."""
    import os

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0a1b2c3d)'\n")
    smi.chmod(0o755)
    code = ("import sys; from quantkit.toolchain.llama_cpp import cuda_device_visible as v; "
            "print(v(), 'torch' in sys.modules)")
    env = {k: x for k, x in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])  # the quantkit under test

    def run(path: str, **extra) -> str:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**env, "PATH": path, **extra})
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout.strip()

    assert run(f"{tmp_path}{os.pathsep}{env['PATH']}") == "True False"
    assert run(f"{tmp_path}{os.pathsep}{env['PATH']}", CUDA_VISIBLE_DEVICES="") == "False False"
    assert run(str(Path(sys.executable).parent)) == "False False"  # no nvidia-smi at all


def test_a_cuda_build_with_no_visible_device_asks_for_no_gpu_layers(monkeypatch):
    from quantkit.evaluation.engines import llama_cpp_engine as eng
    from quantkit.formats.gguf import imatrix_placement

    for hidden in ("", None):  # GPUs hidden; nothing hidden on a host without a GPU
        _cuda_build_without_gpu(monkeypatch, hidden)
        assert eng._gpu_layers() == 0
        assert eng._device_fields() == {"device": "cpu", "device_note": "llama.cpp CUDA build, no CUDA device visible"}
        assert imatrix_placement(Path("unused.gguf"), 2) == (
            ["-ngl", "0"], "cpu (llama.cpp CUDA build, no CUDA device visible; 2 threads)")


def test_a_cuda_build_with_no_visible_device_measures_and_labels_cpu(tiny_gguf, monkeypatch):
    """The whole engine with the GPUs hidden: the windows are scored in the torch-free child (CUDA build beside
    torch) with no GPU layers, llama-bench runs with -ngl 0, and every record says cpu and why."""
    from types import SimpleNamespace

    from quantkit.evaluation.engines.llama_cpp_engine import LlamaCppEngine

    monkeypatch.delenv("QUANTKIT_LLAMA_CPP_CHILD", raising=False)
    _cuda_build_without_gpu(monkeypatch)
    eng = LlamaCppEngine()
    handle = eng.load(tiny_gguf.parent, tiny_gguf.name)
    ids = np.random.default_rng(2).integers(3, 49000, size=(2, 32))
    total, count = eng.nll(handle, ids, label="test")
    scorer = handle.scorers[32]
    assert type(scorer).__name__ == "ChildScorer" and scorer.device == "cpu" and scorer.fallback_reason is None
    assert count == 2 * 31 and np.isfinite(total)
    d = eng.describe(handle)
    assert d["device"] == "cpu" and d["device_note"] == "llama.cpp CUDA build, no CUDA device visible"
    spec = SimpleNamespace(prompt_len=8, gen_len=4, batch_sizes=[1], repetitions=1, warmup=0, threads=2)
    tp = eng.throughput(handle, spec)
    assert tp["device"] == "cpu" and tp["n_gpu_layers"] == 0 and tp["device_note"] == d["device_note"]
    assert tp["batches"]["1"]["decode_tok_s"] > 0
    handle.close()
