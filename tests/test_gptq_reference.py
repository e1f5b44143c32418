"""The calibration sampler and the `gptq-c4/2` / `gptq-concat/2` windows against GPTQ's own code
(IST-DASLab/gptq datautils.py `get_c4` / `get_wikitext2`, transcribed below as published) on a tokenizer that adds
BOS, as Llama-family tokenizers do: quantkit must give the very same token windows."""
from __future__ import annotations

import random

import pytest
import torch

from quantkit.calibration import build_calibration, load_texts, sample_windows
from quantkit.evaluation.perplexity import make_windows

SEQLEN = 64


def reference_get_c4(traindata: list[dict], valdata: list[dict], tokenizer, nsamples: int, seed: int, seqlen: int):
    """GPTQ datautils.get_c4, line for line (the datasets are passed in instead of downloaded)."""
    random.seed(seed)
    trainloader = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(traindata) - 1)
            trainenc = tokenizer(traindata[i]['text'], return_tensors='pt')
            if trainenc.input_ids.shape[1] >= seqlen:
                break
        i = random.randint(0, trainenc.input_ids.shape[1] - seqlen - 1)
        j = i + seqlen
        inp = trainenc.input_ids[:, i:j]
        tar = inp.clone()
        tar[:, :-1] = -100
        trainloader.append((inp, tar))

    random.seed(0)
    valenc = []
    for _ in range(256):
        while True:
            i = random.randint(0, len(valdata) - 1)
            tmp = tokenizer(valdata[i]['text'], return_tensors='pt')
            if tmp.input_ids.shape[1] >= seqlen:
                break
        i = random.randint(0, tmp.input_ids.shape[1] - seqlen - 1)
        j = i + seqlen
        valenc.append(tmp.input_ids[:, i:j])
    valenc = torch.hstack(valenc)
    return trainloader, valenc


def reference_wikitext2_windows(testdata: list[str], tokenizer, seqlen: int, n: int) -> torch.Tensor:
    """get_wikitext2's test encoding and llama.py's evaluation loop: windows testenc[:, i*seqlen:(i+1)*seqlen]."""
    testenc = tokenizer("\n\n".join(testdata), return_tensors='pt').input_ids
    return torch.cat([testenc[:, i * seqlen:(i + 1) * seqlen] for i in range(n)])


@pytest.fixture(scope="module")
def bos_tokenizer(tiny_llama):
    """The tiny BPE tokenizer with a Llama-style template: every encoding starts with <s>."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(tiny_llama / "tokenizer.json"))
    bos = tok.token_to_id("<s>")
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    assert t("a b")["input_ids"][0] == bos and t("a b", add_special_tokens=False)["input_ids"][0] != bos
    return t


@pytest.fixture()
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))


def test_calibration_and_c4_windows_equal_gptq_get_c4(bos_tokenizer, cache):
    train, val = load_texts("c4", "train"), load_texts("c4", "validation")
    state = random.getstate()
    try:
        ref_train, ref_val = reference_get_c4([{"text": d} for d in train.docs], [{"text": d} for d in val.docs],
                                              bos_tokenizer, nsamples=16, seed=3, seqlen=SEQLEN)
    finally:
        random.setstate(state)
    calib = build_calibration(train, bos_tokenizer, "bos-tok", num_samples=16, seq_len=SEQLEN, seed=3)
    assert torch.equal(calib.input_ids, torch.cat([inp for inp, _ in ref_train]))
    # the test tells the two apart: without special tokens (gptq-random-window/1) the windows were others
    plain = sample_windows(train.docs, lambda t: bos_tokenizer(t, add_special_tokens=False)["input_ids"], 16,
                           SEQLEN, seed=3)
    assert not torch.equal(torch.tensor(plain), calib.input_ids)

    windows = make_windows("c4", bos_tokenizer, "bos-tok", SEQLEN, max_windows=None)
    assert windows.meta["protocol"] == "gptq-c4/2" and windows.ids.shape == (256, SEQLEN)
    assert torch.equal(windows.ids.reshape(1, -1), ref_val)
    first8 = make_windows("c4", bos_tokenizer, "bos-tok", SEQLEN, max_windows=8)  # a prefix of the same windows
    assert torch.equal(first8.ids, windows.ids[:8])


def test_wikitext2_windows_equal_gptq_with_bos(bos_tokenizer, cache):
    test = load_texts("wikitext2", "test")
    windows = make_windows("wikitext2", bos_tokenizer, "bos-tok", SEQLEN, max_windows=6)
    assert windows.meta["protocol"] == "gptq-concat/2"
    ref = reference_wikitext2_windows(list(test.docs), bos_tokenizer, SEQLEN, 6)
    assert torch.equal(windows.ids, ref) and windows.ids[0, 0] == bos_tokenizer.bos_token_id
