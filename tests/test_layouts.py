"""GPTQ v1 / AWQ GEMM layouts written from llm-compressor (compressed-tensors pack-quantized) artifacts.

Oracles: compressed-tensors' own decompression and transformers' reload of the CT artifact for the
CT reader; hand-computed int32 words for the packing order; readers written from the format spec."""
from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantkit.formats.layouts import awq_gemm, gptq_v1
from quantkit.formats.layouts.compressed_tensors import (
    dequantize,
    quantization_config,
    read_compressed_tensors,
    shard_files,
)

G = 32


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"t{i}": i for i in range(1, 512)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<unk>")


def _scheme(bits, sym, strategy="group", actorder=None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy=strategy,
                            group_size=G if strategy == "group" else None, actorder=actorder)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Tiny random Llama quantized by llm-compressor in several ways, saved compressed."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("layouts")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=128)
    tok = _tokenizer()
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    ids = torch.randint(1, 512, (8, 64))
    calib = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    plans = {  # name: (modifier, model dtype, use data, shard size)
        "rtn_sym": (QuantizationModifier(config_groups=_scheme(4, True), ignore=["lm_head"]), torch.float32, False, None),
        "rtn_asym": (QuantizationModifier(config_groups=_scheme(4, False), ignore=["lm_head"]), torch.bfloat16, False, "200KB"),
        "gptq_sym": (GPTQModifier(config_groups=_scheme(4, True, actorder="weight"), ignore=["lm_head"]), torch.float32, True, None),
        "rtn_int8": (QuantizationModifier(config_groups=_scheme(8, True, "channel"), ignore=["lm_head"]), torch.float32, False, None),
    }
    out = {"base": root / "base"}
    for name, (modifier, dtype, data, shard) in plans.items():
        model = LlamaForCausalLM.from_pretrained(root / "base", dtype=dtype)
        kw = dict(dataset=calib, tokenizer=tok, num_calibration_samples=8, max_seq_length=64) if data else {}
        oneshot(model=model, recipe=modifier, **kw)
        extra = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(root / name, save_compressed=True, **extra)
        tok.save_pretrained(root / name)
        out[name] = root / name
    out["asym_gidx"] = _with_synthetic_g_idx(out["rtn_asym"], root / "asym_gidx")
    return out


def _with_synthetic_g_idx(src, dst):
    """compressed-tensors 0.19 removed actorder='group', so llm-compressor cannot emit weight_g_idx any more;
    add one by hand (a permutation of i // G, as act-order produces) plus an all -1 "unused" one."""
    shutil.copytree(src, dst)
    target, unused = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"
    for path in shard_files(dst):
        with safe_open(str(path), framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
        for mod, fill in ((target, None), (unused, -1)):
            if f"{mod}.weight_packed" in t:
                n = int(t[f"{mod}.weight_shape"][1])
                g = torch.arange(n, dtype=torch.int32) // G
                t[f"{mod}.weight_g_idx"] = g[torch.randperm(n)] if fill is None else torch.full((n,), fill, dtype=torch.int32)
        save_file(t, str(path), metadata={"format": "pt"})
    return dst


def _int32(u: int) -> int:
    return u - 2**32 if u >= 2**31 else u


# ---------------- packing-order oracles (hand-computed words) ----------------

def test_packing_words_match_spec():
    q = torch.arange(1, 9, dtype=torch.uint8).view(1, 8)  # out=1, in=8: q[0, i] = i + 1
    assert gptq_v1.pack_gptq_qweight(q, 4).tolist() == [[_int32(0x87654321)]]  # input i -> nibble i
    assert gptq_v1.pack_gptq_qweight(torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8), 8).tolist() == [[0x04030201]]
    qz, n = gptq_v1.pack_gptq_qzeros(torch.full((8, 2), 8, dtype=torch.uint8), 4)  # sym int4: z=8 -> 7
    assert qz.tolist() == [[0x77777777], [0x77777777]] and n == 0
    # AWQ: word nibble i holds column AWQ_ORDER[i]; columns 0..7 hold values 0..7 -> nibbles 0,2,4,6,1,3,5,7
    assert awq_gemm.pack_awq(torch.arange(8).view(1, 8)).tolist() == [[0x75316420]]
    assert awq_gemm.pack_awq(torch.arange(8, 16).view(1, 8)).tolist() == [[_int32(0xFDB9ECA8)]]
    # compressed-tensors: signed value + 8, packed along the input dim, element 0 lowest
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    assert pack_to_int32((q.to(torch.int8) - 8), 4).tolist() == [[_int32(0x87654321)]]


def test_readers_decode_hand_written_words(tmp_path):
    """The readers on checkpoints whose words were written by hand (no writer involved)."""
    d = tmp_path / "gptq"
    d.mkdir()
    (d / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 8}))
    save_file({"m.qweight": torch.tensor([[_int32(0x87654321)] * 8], dtype=torch.int32),  # [in/8=1, out=8]
               "m.qzeros": torch.tensor([[_int32(0x76543210)]], dtype=torch.int32),  # stored zero-1 per column
               "m.scales": torch.full((1, 8), 0.5, dtype=torch.float16),
               "m.g_idx": torch.zeros(8, dtype=torch.int32)}, str(d / "model.safetensors"))
    r = gptq_v1.read_gptq_v1(d)["m"]
    assert r["q"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]] * 8 and r["zero"][:, 0].tolist() == list(range(1, 9))
    assert r["weight"][3].tolist() == [(i - 4) * 0.5 for i in range(1, 9)]
    a = tmp_path / "awq"
    a.mkdir()
    (a / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 8}}))
    save_file({"m.qweight": torch.tensor([[0x75316420]] * 8, dtype=torch.int32),  # [in=8, out/8=1]
               "m.qzeros": torch.tensor([[0x33333333]], dtype=torch.int32),
               "m.scales": torch.ones((1, 8), dtype=torch.float16)}, str(a / "model.safetensors"))
    r = awq_gemm.read_awq_gemm(a)["m"]
    assert r["q"][:, 0].tolist() == list(range(8)) and (r["zero"] == 3).all()
    assert r["weight"][:, 0].tolist() == [float(c - 3) for c in range(8)]


def test_gptq_zero_point_underflow_refused():
    z = torch.tensor([[0], [5]] * 4, dtype=torch.uint8)  # out=8, one group, some zeros are 0
    with pytest.raises(ValueError, match="zero point"):
        gptq_v1.pack_gptq_qzeros(z, 4)
    qz, n = gptq_v1.pack_gptq_qzeros(z, 4, allow_underflow=True)
    assert n == 4 and qz.tolist() == [[_int32(0x4F4F4F4F)]]  # -1 wraps to 0xF; readers then decode 16


# ---------------- compressed-tensors reader vs compressed-tensors / transformers ----------------

def _ct_decompress(ct_dir, name, scale=None):
    """compressed-tensors' own per-module decompression (optionally with a substituted scale)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    sd = {}
    for path in shard_files(ct_dir):
        with safe_open(str(path), framework="pt") as f:
            sd.update({k.rsplit(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.rsplit(".", 1)[0] == name})
    if scale is not None:
        sd["weight_scale"] = scale
    args = quantization_config(ct_dir)["config_groups"]["group_0"]["weights"]
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs.model_validate(args))
    return PackedQuantizationCompressor.decompress(sd, scheme)["weight"]


@pytest.mark.parametrize("name", ["rtn_sym", "rtn_asym", "gptq_sym", "rtn_int8"])
def test_ct_reader_matches_compressed_tensors_and_transformers(artifacts, name):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    ct = artifacts[name]
    layers, other = read_compressed_tensors(ct)
    assert len(layers) == 14 and "lm_head.weight" in other  # 7 Linears x 2 layers; lm_head ignored
    model = AutoModelForCausalLM.from_pretrained(ct, quantization_config=CompressedTensorsConfig(dequantize=True))
    reloaded = dict(model.named_parameters())
    for mod, layer in layers.items():
        bits = layer.bits
        assert layer.q.dtype == torch.uint8 and int(layer.q.max()) <= 2**bits - 1
        assert layer.zero.shape == layer.scale.shape == (layer.shape[0], layer.ngroups)
        if layer.symmetric:
            assert (layer.zero == 2 ** (bits - 1)).all()
        w = dequantize(layer)
        assert torch.equal(w, _ct_decompress(ct, mod))  # bit-exact vs compressed-tensors
        s16 = layer.scale.to(torch.float16)
        assert torch.equal(dequantize(layer, scale=s16), _ct_decompress(ct, mod, scale=s16))
        r = reloaded[f"{mod}.weight"].detach()
        assert r.dtype == w.dtype and torch.equal(r, w)  # reload dtype == scale dtype here, so exact


# ---------------- classic layouts: write, read back, compare ----------------

def _check_common(out, ct, layers, other):
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).exists(), f
    assert [p.name for p in shard_files(out)] == [p.name for p in shard_files(ct)]
    written = {}
    for path in shard_files(out):
        with safe_open(str(path), framework="pt") as f:
            written.update({k: f.get_tensor(k) for k in f.keys() if k in other})
    assert set(written) == set(other)
    for k, v in other.items():  # non-quantized tensors: fp16 copies
        assert written[k].dtype == torch.float16 and torch.equal(written[k], v.to(torch.float16)), k


def _raw(out, mod):
    t = {}
    for path in shard_files(out):
        with safe_open(str(path), framework="pt") as f:
            t.update({k.rsplit(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.rsplit(".", 1)[0] == mod})
    return t


@pytest.mark.parametrize("name", ["rtn_sym", "rtn_asym", "gptq_sym", "rtn_int8", "asym_gidx"])
def test_gptq_v1_roundtrip(artifacts, tmp_path, name):
    ct, out = artifacts[name], tmp_path / "gptq"
    summary = gptq_v1.write_gptq_v1(ct, out)
    layers, other = read_compressed_tensors(ct)
    _check_common(out, ct, layers, other)
    qc = json.loads((out / "quantize_config.json").read_text())
    assert json.loads((out / "config.json").read_text())["quantization_config"] == qc
    bits = 8 if name == "rtn_int8" else 4
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq" and qc["bits"] == bits
    assert qc["group_size"] == (-1 if name == "rtn_int8" else G) and qc["sym"] == (name in ("rtn_sym", "gptq_sym", "rtn_int8"))
    assert qc["desc_act"] == (name == "asym_gidx")
    back = gptq_v1.read_gptq_v1(out)
    assert sorted(back) == sorted(layers)
    pf = 32 // bits
    for mod, layer in layers.items():
        (o, i), ng, raw = layer.shape, layer.ngroups, _raw(out, mod)
        assert {k: (v.dtype, tuple(v.shape)) for k, v in raw.items()} == {
            "qweight": (torch.int32, (i // pf, o)), "qzeros": (torch.int32, (ng, o // pf)),
            "scales": (torch.float16, (ng, o)), "g_idx": (torch.int32, (i,))}
        if layer.symmetric and bits == 4:
            assert (raw["qzeros"] == _int32(0x77777777)).all()
        r, s16 = back[mod], layer.scale.to(torch.float16)
        assert torch.equal(r["q"], layer.q.to(torch.int16)) and torch.equal(r["zero"], layer.zero.to(torch.int16))
        assert torch.equal(r["g_idx"], layer.g_idx) and torch.equal(r["scale"], s16)
        assert torch.equal(r["weight"], dequantize(layer, scale=s16))  # bit-exact given the fp16 scale
        if not layer.explicit_g_idx:  # CT 0.19 ignores g_idx, so it is an oracle only without one
            assert torch.equal(r["weight"], _ct_decompress(ct, mod, scale=s16))
        else:
            assert not layer.has_trivial_g_idx() and mod == "model.layers.0.self_attn.q_proj"
    dw = summary["max_abs_dw_vs_original_scale"]
    print(f"\n[{name}] GPTQ v1 max|dW| vs original-precision scale: {dw:.3g}")
    assert dw < 1e-3 and summary["zero_underflow"] == 0


@pytest.mark.parametrize("name", ["rtn_asym"])
def test_awq_gemm_roundtrip(artifacts, tmp_path, name):
    ct, out = artifacts[name], tmp_path / "awq"
    summary = awq_gemm.write_awq_gemm(ct, out)
    layers, other = read_compressed_tensors(ct)
    _check_common(out, ct, layers, other)
    assert json.loads((out / "config.json").read_text())["quantization_config"] == {
        "quant_method": "awq", "zero_point": True, "group_size": G, "bits": 4, "version": "gemm",
        "modules_to_not_convert": ["lm_head"]}
    back = awq_gemm.read_awq_gemm(out)
    assert sorted(back) == sorted(layers)
    for mod, layer in layers.items():
        (o, i), ng, raw = layer.shape, layer.ngroups, _raw(out, mod)
        assert {k: (v.dtype, tuple(v.shape)) for k, v in raw.items()} == {
            "qweight": (torch.int32, (i, o // 8)), "qzeros": (torch.int32, (ng, o // 8)),
            "scales": (torch.float16, (ng, o))}
        r, s16 = back[mod], layer.scale.to(torch.float16)
        assert torch.equal(r["q"], layer.q.to(torch.int16)) and torch.equal(r["zero"], layer.zero.to(torch.int16))
        assert torch.equal(r["scale"], s16)
        assert torch.equal(r["weight"], dequantize(layer, scale=s16))
        assert torch.equal(r["weight"], _ct_decompress(ct, mod, scale=s16))
    print(f"\n[{name}] AWQ GEMM max|dW| vs original-precision scale: {summary['max_abs_dw_vs_original_scale']:.3g}")
    assert summary["max_abs_dw_vs_original_scale"] < 1e-3


@pytest.mark.parametrize("name,msg", [("rtn_sym", "asymmetric"), ("rtn_int8", "4-bit"), ("asym_gidx", "g_idx")])
def test_awq_gemm_refuses_incompatible(artifacts, tmp_path, name, msg):
    with pytest.raises(ValueError, match=msg):
        awq_gemm.write_awq_gemm(artifacts[name], tmp_path / "awq")


def test_actorder_group_removed_in_compressed_tensors():
    """Why the g_idx case above is synthetic: compressed-tensors 0.19 rejects actorder='group'."""
    with pytest.raises(ValueError, match="removed"):
        _scheme(4, True, actorder="group")


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None,
                    reason="gptqmodel not installed: transformers 5 has no loader of its own for classic GPTQ/AWQ "
                           "checkpoints (it asks for gptqmodel), so the real-consumer check cannot run here")
def test_transformers_with_gptqmodel_reads_classic_layouts_as_the_ct_artifact(artifacts, tmp_path):
    """The real consumer: transformers + gptqmodel load the v1 / GEMM exports and compute what the
    compressed-tensors artifact computes (same integers and scales, so the logits agree closely)."""
    from transformers import AutoModelForCausalLM

    gptq_v1.write_gptq_v1(artifacts["rtn_asym"], tmp_path / "g")
    awq_gemm.write_awq_gemm(artifacts["rtn_asym"], tmp_path / "a")
    ids = torch.randint(1, 512, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(artifacts["rtn_asym"], dtype=torch.float32)(ids).logits
        for d in ("g", "a"):
            got = AutoModelForCausalLM.from_pretrained(tmp_path / d, dtype=torch.float16)(ids).logits.float()
            rel = (got - ref).norm() / ref.norm()
            assert rel < 2e-2, (d, float(rel))