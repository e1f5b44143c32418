"""Calibration sampling on real C4: deterministic for a seed, different across seeds, GPTQ's windows."""
from __future__ import annotations

import pytest

from quantkit.calibration import build_calibration, load_texts, sample_windows
from quantkit.errors import UserError


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def c4():
    return load_texts("c4", "train")


def test_c4_is_read_from_quantkit_data(c4):
    assert len(c4.docs) == 1000 and c4.origin.endswith("c4/c4-train-sample.jsonl")
    assert c4.sha256 == "cdd5b754119131d2934e3e799a059a9d64f53a6aac9e7e2ef79b43120bb01a32"
    assert c4.docs[0].startswith("Beginners BBQ Class")


def test_same_seed_same_windows_other_seed_differs(c4, tok, monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    a = build_calibration(c4, tok, "tokfp", num_samples=8, seq_len=64, seed=0)
    b = build_calibration(c4, tok, "tokfp", num_samples=8, seq_len=64, seed=0)
    c = build_calibration(c4, tok, "tokfp", num_samples=8, seq_len=64, seed=1)
    assert a.input_ids.shape == (8, 64)
    assert a.fingerprint == b.fingerprint and a.fingerprint != c.fingerprint
    assert (a.input_ids == b.input_ids).all()
    assert not (a.input_ids == c.input_ids).all()
    # the cache must not change what a fingerprint means: recompute without it
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "fresh"))
    d = build_calibration(c4, tok, "tokfp", num_samples=8, seq_len=64, seed=0)
    assert (a.input_ids == d.input_ids).all()


def test_windows_are_contiguous_slices_of_long_enough_documents(c4, tok):
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    windows = sample_windows(c4.docs, enc, n=4, seq_len=128, seed=7)
    docs = [enc(d) for d in c4.docs]
    for w in windows:
        assert len(w) == 128
        assert any(len(d) > 128 and any(d[j:j + 128] == w for j in range(len(d) - 127)) for d in docs)


def test_impossible_seq_len_is_one_clear_error(tok):
    with pytest.raises(UserError, match="seq_len"):
        sample_windows(("short doc", "another"), lambda s: tok(s)["input_ids"], n=1, seq_len=4096, seed=0)


def test_text_jsonl_and_parquet_files(tmp_path, c4):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text('{"body": "x"}\n{"body": "y"}\n')
    pq.write_table(pa.table({"text": list(c4.docs[:3])}), tmp_path / "c.parquet")
    assert load_texts(str(tmp_path / "a.txt"), "train").docs == ("hello world",)
    assert load_texts(str(tmp_path / "b.jsonl"), "train", None, "body").docs == ("x", "y")
    assert load_texts(str(tmp_path / "c.parquet"), "train").docs == c4.docs[:3]
    with pytest.raises(UserError, match="no field .text."):
        load_texts(str(tmp_path / "b.jsonl"), "train", None, "text")


def test_missing_data_offline_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTKIT_DATA", str(tmp_path))
    load_texts.cache_clear()
    with pytest.raises(UserError) as e:
        load_texts("c4", "validation")
    assert "QUANTKIT_DATA" in e.value.one_line() and "\n" not in e.value.one_line()
    load_texts.cache_clear()
