"""Glue of the compiled engine: q/k/v and gate/up fused into one GEMM (kernels/fuse.py) compute the same function
as the separate linears, and the int4 module picks its kernel per call by tokens (decode vs prefill).
Oracle: the separate modules' outputs, and the transformers model's logits for the whole decoder."""
from __future__ import annotations

import torch

from quantkit.evaluation.kernels.fuse import concat, fuse_layers
from quantkit.evaluation.kernels.linear import Int4Linear, make_linear
from quantkit.evaluation.kernels.weights import QuantWeight


def _int4(n, k, g, gen, pqs=None):
    return QuantWeight("int4", q=torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8),
                       scale=torch.rand(n, k // g, generator=gen) * 0.02 + 0.001,
                       zero=torch.randint(0, 16, (n, k // g), generator=gen).float(), group_size=g,
                       pre_quant_scale=pqs)


def _fp8(n, k, gen, scale, input_scale):
    w = (torch.randn(n, k, generator=gen) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    return QuantWeight("fp8", weight=w, weight_scale=scale, input_scale=input_scale)


def _separate_vs_fused(parts, x, kernels):
    want = torch.cat([make_linear(p, "cpu", x.dtype, kernels)(x) for p in parts], -1)
    fused = concat(parts)
    assert fused is not None and fused.shape == (sum(p.shape[0] for p in parts), parts[0].shape[1])
    return float((make_linear(fused, "cpu", x.dtype, kernels)(x) - want).norm() / want.norm())


def test_fused_linears_compute_the_separate_ones():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 128, generator=g)
    ref = {"fp8": "reference", "int4": "reference"}
    # int4 with different scales and zero points per part; dense with biases
    assert _separate_vs_fused([_int4(n, 128, 32, g) for n in (64, 16, 16)], x, ref) < 1e-6
    dense = [QuantWeight("dense", weight=torch.randn(n, 128, generator=g), bias=torch.randn(n, generator=g))
             for n in (64, 16)]
    assert _separate_vs_fused(dense, x, ref) < 1e-6
    # fp8: different per-tensor weight scales become per-row; the shared static activation scale stays
    s_in = torch.tensor(0.01)
    parts = [_fp8(n, 128, g, torch.tensor(s), s_in) for n, s in ((64, 0.001), (16, 0.002), (16, 0.003))]
    assert concat(parts).weight_scale.shape == (96,)
    assert _separate_vs_fused(parts, x, ref) < 1e-6
    # not one kernel call: different activation scales, group sizes or AWQ pre-scales stay separate
    assert concat([_fp8(16, 128, g, torch.tensor(0.001), s_in), _fp8(16, 128, g, torch.tensor(0.001), s_in * 2)]) is None
    assert concat([_int4(16, 128, 32, g), _int4(16, 128, 64, g)]) is None
    assert concat([_int4(16, 128, 32, g, torch.ones(128)), _int4(16, 128, 32, g, torch.full((128,), 2.0))]) is None


def test_fuse_layers_replaces_groups_only_where_every_layer_fuses():
    g = torch.Generator().manual_seed(1)
    lin = {f"model.layers.{i}.{m}": _int4(32, 64, 32, g) for i in range(2)
           for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    lin["model.layers.1.mlp.up_proj"] = _int4(32, 64, 16, g)  # another group size in one layer
    done = fuse_layers(lin, 2, {"int4"})
    assert done == {"self_attn.qkv_proj"}
    assert "model.layers.0.self_attn.qkv_proj" in lin and "model.layers.0.self_attn.q_proj" not in lin
    assert "model.layers.0.mlp.gate_proj" in lin and lin["model.layers.1.self_attn.qkv_proj"].shape == (96, 64)
    assert fuse_layers(lin, 2, {"fp8"}) == set()


def test_int4_module_picks_its_kernel_by_tokens():
    g = torch.Generator().manual_seed(2)
    qw = _int4(64, 256, 64, g)
    m = Int4Linear(qw, "cpu", torch.bfloat16, {"1": "tinygemm", "4": "dequant"})
    assert m.kernel == "tinygemm@1/dequant@4" and [m.pick(t) for t in (1, 3, 4, 2048)] == ["tinygemm"] * 2 + ["dequant"] * 2
    for rows in (1, 8):
        x = torch.randn(rows, 256, generator=g)
        want = x @ qw.dequantize().t()
        got = m(x.bfloat16()).float()
        assert float((got - want).norm() / want.norm()) < 2e-2, rows


def test_fused_engine_matches_transformers(tiny_llama):
    """The whole decoder, fused (the default) and not, against transformers' own logits."""
    from transformers import AutoModelForCausalLM

    from quantkit.evaluation.engines import get_engine

    engine = get_engine("torch-compiled")
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(12)
    want = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32)(ids).logits
    fused = engine.load(tiny_llama)
    assert fused.used["fused"] == ["mlp.gate_up_proj", "self_attn.qkv_proj"]
    plain = engine.load(tiny_llama, kernels={"fuse": []})
    assert "fused" not in plain.used
    with torch.inference_mode():
        for h in (fused, plain):
            got = h.model(ids, pos)
            assert float((got - want).norm() / want.norm()) < 1e-5


def test_tinygemm_falls_back_where_it_cannot_pack():
    """K = 576 (SmolLM2's hidden size) is no multiple of tinygemm's 128-wide K tiles: the H200 demo run
    failed there; the module now takes the next kernel (the reference path on a CPU)."""
    g = torch.Generator().manual_seed(4)
    qw = _int4(64, 576, 64, g)
    m = Int4Linear(qw, "cpu", torch.bfloat16, {"1": "tinygemm", "16": "dequant"})
    assert m.kernel == "reference@1/dequant@16"
    x = torch.randn(2, 576, generator=g)
    want = x @ qw.dequantize().t()
    assert float((m(x.bfloat16()).float() - want).norm() / want.norm()) < 2e-2


def test_tied_embedding_saved_under_the_head_name(tiny_llama, tmp_path):
    """A tied checkpoint that stores the shared matrix only as lm_head.weight (safetensors' save_model keeps
    one name per shared tensor) loads with that matrix as the embedding."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from quantkit.evaluation.engines import get_engine

    d = tmp_path / "tied"
    shutil.copytree(tiny_llama, d)
    sd = load_file(str(d / "model.safetensors"))
    sd["lm_head.weight"] = sd.pop("model.embed_tokens.weight")
    save_file(sd, str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    h = get_engine("torch-compiled").load(d)
    assert torch.equal(h.model.model.embed_tokens.weight, sd["lm_head.weight"])
    assert torch.equal(h.model.lm_head.weight, sd["lm_head.weight"])
