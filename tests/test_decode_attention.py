"""The compiled engine's decode attention variants (kernels/attention.py) and int4 decode kernels compute the same
function. Oracles: torch's causal SDPA over the real keys only (no cache, no mask), and the whole decoder's
prefill logits (a decode step after t-1 tokens must give the logits prefill gives at position t)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantkit.evaluation.kernels.attention import VARIANTS, decode_attention, decode_mask
from quantkit.evaluation.kernels.linear import Int4Linear
from quantkit.evaluation.kernels.weights import QuantWeight


@pytest.mark.parametrize("heads,kv", [(8, 2), (4, 4)])  # GQA and MHA
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_equals_attention_over_the_filled_cache(variant, heads, kv):
    g = torch.Generator().manual_seed(0)
    b, d, length = 3, 32, 40
    q = torch.randn(b, heads, 1, d, generator=g)
    k, v = torch.randn(b, kv, length, d, generator=g), torch.randn(b, kv, length, d, generator=g)
    for p in (0, 17, length - 1):
        pos = torch.tensor([p])
        keys, vals = k[:, :, : p + 1], v[:, :, : p + 1]  # slots after p hold stale values that must not count
        want = F.scaled_dot_product_attention(q, keys.repeat_interleave(heads // kv, 1),
                                              vals.repeat_interleave(heads // kv, 1))
        got = decode_attention(variant, q, k, v, pos, decode_mask(pos, length))
        assert got.shape == want.shape and got.dtype == q.dtype
        assert float((got - want).abs().max()) < 1e-5, (variant, p)


def test_bf16_variants_agree_within_rounding():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 8, 1, 64, generator=g).bfloat16()
    k, v = (torch.randn(2, 2, 64, 64, generator=g).bfloat16() for _ in range(2))
    pos = torch.tensor([50])
    ref = decode_attention("matmul", q.float(), k.float(), v.float(), pos, decode_mask(pos, 64))
    for variant in VARIANTS:
        got = decode_attention(variant, q, k, v, pos, decode_mask(pos, 64, torch.bfloat16)).float()
        assert float((got - ref).norm() / ref.norm()) < 1e-2, variant


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_engine_decode_step_equals_prefill(tiny_llama, variant):
    """The decoder with each variant: prefill t-1 tokens into the cache, one decode step, against the logits a
    prefill of all t tokens gives at the last position (GQA: the tiny Llama has 4 heads over 2 KV heads)."""
    from quantkit.evaluation.engines import get_engine

    h = get_engine("torch-compiled").load(tiny_llama, kernels={"attention": variant})
    assert h.used["attention"] == [variant]
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = h.model(ids, torch.arange(10))[:, -1]
        h.model.setup_cache(2, 10, torch.float32, "cpu")
        assert h.model.model.layers[0].self_attn.cache.k.shape[2] == 64  # rounded up: aligned rows for the GEMMs
        h.model(ids[:, :9], torch.arange(9))
        got = h.model(ids[:, 9:], torch.tensor([9]))[:, -1]
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_int4_decode_kernels_equal_the_dequantized_weights():
    """tinygemm with 2/4/8 inner K tiles (torch's CPU build) and the inductor-fused dequant paths (bytes and
    int32 words, whose top nibble sets the sign bit), one token and a few, against x @ W^T, W dequantized in fp32."""
    g = torch.Generator().manual_seed(3)
    n, k, gs = 96, 256, 64
    qw = QuantWeight("int4", q=torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8),
                     scale=torch.rand(n, k // gs, generator=g) * 0.02 + 0.001,
                     zero=torch.randint(0, 16, (n, k // gs), generator=g).float(), group_size=gs)
    for kernel in ("tinygemm", "tinygemm-k4", "tinygemm-k2", "inductor", "inductor-i32"):
        m = Int4Linear(qw, "cpu", torch.bfloat16, kernel)
        for rows in (1, 3):
            x = torch.randn(rows, k, generator=g)
            want = x @ qw.dequantize().t()
            got = m(x.bfloat16()).float()
            assert float((got - want).norm() / want.norm()) < 2e-2, (kernel, rows)
    with pytest.raises(ValueError, match="unknown int4 kernel"):
        Int4Linear(qw, "cpu", torch.bfloat16, "marlin")


def test_bench_script_dry_run_writes_a_table_the_engine_takes(tmp_path):
    """scripts/bench_decode_attention.py's logic on a CPU (tiny shapes, no compile or graph): every variant runs
    and agrees with the reference, and the choice table it writes holds kernels the engine accepts."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from quantkit.evaluation.kernels.attention import check_variant
    from quantkit.evaluation.kernels.choices import choose

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "scripts/bench_decode_attention.py"), "--dry-run", "--device",
                        "cpu", "--layers", "1", "--batches", "1,2", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "decode-bench.json").read_text())["rows"]
    att = [x for x in rows if x["part"] == "attention"]
    assert {x["variant"] for x in att} == set(VARIANTS) and all(x["rel_err"] < 1e-5 for x in att)
    assert all(x["rel_err"] < 2e-2 for x in rows if x["part"] == "gemv")
    table = json.loads((tmp_path / "choices.json").read_text())["cpu"]
    for batch in (1, 2):
        check_variant(choose(table, batch)["attention"])
    qw = QuantWeight("int4", q=torch.randint(0, 16, (32, 128), dtype=torch.uint8), scale=torch.rand(32, 1),
                     zero=torch.full((32, 1), 8.0), group_size=128)
    assert Int4Linear(qw, "cpu", torch.bfloat16, choose(table, 1)["int4"]).kernel == table["int4"]["1"]
