"""The llama.cpp engine's scoring in a child process without torch (quantkit/toolchain/llama_cpp_scorer.py): on a
GPU host the binding over a CUDA build segfaults beside torch (docs/benchmarks/h200-x2/README.md), so there the
engine scores in a child. Here (CPU build) both paths run: the child must give the in-process numbers and must
not have torch loaded."""
from __future__ import annotations

import subprocess
import sys

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
