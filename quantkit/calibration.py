"""Text datasets (definitions in the top-level `calibration/` folder) and GPTQ-style window sampling.

The calibration set is sampled once per build and shared by every target; it is cached on disk under a
fingerprint of (dataset file hashes, tokenizer files, parameters), so re-runs and other recipes reuse it.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable


from quantkit.errors import UserError
from quantkit.util import cache_dir, cached_sha256, sha256_json

DEFINITIONS = Path(os.environ.get("QUANTKIT_DATASETS", Path(__file__).resolve().parents[1] / "calibration"))
# bump when sampling changes, so cached sets are not reused. /2: documents are tokenized with the tokenizer's
# default special tokens (BOS for Llama-family tokenizers), as GPTQ's datautils.get_c4 does
SAMPLER_VERSION = "gptq-random-window/2"


@dataclass(frozen=True)
class TextSource:
    """Documents of one dataset split, with the sha256 of what they were read from."""

    name: str
    split: str
    origin: str  # file path or hub reference
    sha256: str
    docs: tuple[str, ...]


DATA_SUFFIXES = (".txt", ".jsonl", ".parquet")


def dataset_names() -> list[str]:
    return sorted(p.stem for p in DEFINITIONS.glob("*.yaml"))


def is_dataset_file(dataset: str) -> bool:
    return Path(dataset).suffix in DATA_SUFFIXES


def _definitions() -> dict[str, dict]:
    from quantkit import safe_yaml

    return {p.stem: safe_yaml.load(p, "dataset definition")[0] for p in sorted(DEFINITIONS.glob("*.yaml"))}


def _read_file(path: Path, text_field: str) -> list[str]:
    """Documents of a .txt/.jsonl/.parquet file; anything malformed is a one-line UserError with file:line."""
    if path.suffix not in DATA_SUFFIXES:
        raise UserError(f"unsupported dataset file {path.name}", fix="use .txt, .jsonl or .parquet")
    if not path.is_file():
        raise UserError(f"dataset {path} is not a regular file")
    if path.suffix == ".txt":
        return [_utf8(path.read_bytes(), path, 1)]
    if path.suffix == ".jsonl":
        rows = []
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                line = _utf8(raw, path, n)
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except (json.JSONDecodeError, RecursionError) as e:
                        raise UserError(f"invalid JSON line: {getattr(e, 'msg', type(e).__name__)}",
                                        where=f"{path}:{n}", fix="one JSON object per line") from None
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path, columns=[text_field]).to_pylist()
        except (pa.ArrowException, OSError, KeyError) as e:
            raise UserError(f"cannot read column {text_field!r} of parquet file {path}: {type(e).__name__}: "
                            f"{str(e)[:200]}", fix="check the file and calibration.text_field") from None
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict) or not isinstance(r.get(text_field), str):
            fields = ", ".join(map(str, r)) if isinstance(r, dict) else type(r).__name__
            raise UserError(f"row {n} has no field {text_field!r} holding text (it has: {fields[:200]})",
                            where=f"{path}:{n}", fix="set calibration.text_field")
    return [r[text_field] for r in rows]


def _utf8(raw: bytes, path: Path, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line += raw[:e.start].count(b"\n")
        raise UserError(f"not UTF-8 text (byte 0x{raw[e.start]:02x})", where=f"{path}:{line}",
                        fix="re-encode the file as UTF-8") from None


def _from_hub(ref: dict, split: str, text_field: str) -> tuple[list[str], str]:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise OSError("hub offline")
    import datasets

    ds = datasets.load_dataset(ref["repo"], ref.get("name"), data_files=ref.get("data_files"),
                               split=ref.get("split", "train"))
    digest = sha256_json([cached_sha256(Path(f["filename"])) for f in ds.cache_files])
    return list(ds[text_field]), digest


def load_texts(dataset: str, split: str, path: str | None = None, text_field: str = "text") -> TextSource:
    """Resolve a dataset name or file: recipe path > $QUANTKIT_DATA/<local> > the hub."""
    return _load_texts(dataset, split, path, text_field, os.environ.get("QUANTKIT_DATA"))


@lru_cache(maxsize=8)  # keyed on $QUANTKIT_DATA too: one process may read two data folders (tests, a library user)
def _load_texts(dataset: str, split: str, path: str | None, text_field: str, data_root: str | None) -> TextSource:
    if path or is_dataset_file(dataset):
        p = Path(path or dataset)
        if not p.is_file():
            raise UserError(f"calibration file not found (or not a file): {p}", fix="check calibration.path")
        return TextSource(dataset, split, str(p), cached_sha256(p), tuple(_read_file(p, text_field)))
    defs = _definitions()
    if dataset not in defs:
        raise UserError(f"unknown dataset {dataset!r}; defined: {', '.join(defs)}",
                        fix=f"add {DEFINITIONS}/{dataset}.yaml or give a file path")
    d = defs[dataset]
    if split not in d["splits"]:
        raise UserError(f"dataset {dataset!r} has no split {split!r}; splits: {', '.join(d['splits'])}")
    spec, field = d["splits"][split], d.get("text_field", text_field)
    if data_root and (Path(data_root) / spec["local"]).exists():
        p = Path(data_root) / spec["local"]
        return TextSource(dataset, split, str(p), cached_sha256(p), tuple(_read_file(p, field)))
    try:
        docs, digest = _from_hub(spec["hub"], split, field)
    except Exception as e:  # offline, no credentials, or the hub refused: one line either way
        raise UserError(f"dataset {dataset}/{split}: not under $QUANTKIT_DATA ({data_root or 'unset'}) and the hub "
                        f"is unreachable ({type(e).__name__})",
                        fix=f"set QUANTKIT_DATA to a folder holding {spec['local']}") from None
    return TextSource(dataset, split, f"hf://{spec['hub']['repo']}", digest, tuple(docs))


load_texts.cache_clear = _load_texts.cache_clear  # type: ignore[attr-defined]


def gptq_encoder(tokenizer) -> Callable[[str], list[int]]:
    """How GPTQ's datautils tokenizes (`tokenizer(text)`): with the tokenizer's default special tokens, so a
    Llama-family document starts with BOS. Calibration and every perplexity protocol encode through this."""
    return lambda text: tokenizer(text)["input_ids"]


def sample_windows(docs: tuple[str, ...], encode: Callable[[str], list[int]], n: int, seq_len: int,
                   seed: int) -> list[list[int]]:
    """GPTQ's sampler (datautils.get_c4): pick a random document longer than seq_len tokens, then a random
    window in it; repeat n times. Same seed, same windows; the RNG sequence matches the reference code. One
    deliberate difference: a document of exactly seq_len tokens is passed over here, where the reference
    accepts it and then fails (`randint(0, -1)`); every draw the reference completes is the same."""
    rng = random.Random(seed)
    cache: dict[int, list[int]] = {}
    tried: set[int] = set()
    windows = []
    for _ in range(n):
        while True:
            i = rng.randint(0, len(docs) - 1)
            if i not in cache:
                cache[i] = encode(docs[i])
            tried.add(i)
            if len(cache[i]) > seq_len:
                break
            if len(tried) == len(docs) and all(len(v) <= seq_len for v in cache.values()):
                raise UserError(f"no document has more than seq_len={seq_len} tokens",
                                fix="lower calibration.seq_len or use a dataset with longer documents")
        j = rng.randint(0, len(cache[i]) - seq_len - 1)
        windows.append(cache[i][j:j + seq_len])
    return windows


@dataclass(frozen=True)
class CalibrationSet:
    input_ids: "object"  # torch.LongTensor [num_samples, seq_len]
    fingerprint: str
    meta: dict


def calibration_fingerprint(source: TextSource, tokenizer_fp: str, num_samples: int, seq_len: int,
                            seed: int) -> str:
    return sha256_json({"dataset": source.sha256, "tokenizer": tokenizer_fp, "n": num_samples,
                        "seq_len": seq_len, "seed": seed, "sampler": SAMPLER_VERSION})


def build_calibration(source: TextSource, tokenizer, tokenizer_fp: str, num_samples: int, seq_len: int,
                      seed: int) -> CalibrationSet:
    import torch
    from safetensors.torch import load_file, save_file

    fp = calibration_fingerprint(source, tokenizer_fp, num_samples, seq_len, seed)
    meta = {"fingerprint": fp, "dataset": source.name, "split": source.split, "origin": source.origin,
            "dataset_sha256": source.sha256, "num_samples": num_samples, "seq_len": seq_len, "seed": seed,
            "sampler": SAMPLER_VERSION, "tokens": num_samples * seq_len}
    path = cache_dir("calibration") / f"{fp}.safetensors"
    if path.exists():
        return CalibrationSet(load_file(path)["input_ids"], fp, meta)
    windows = sample_windows(source.docs, gptq_encoder(tokenizer), num_samples, seq_len, seed)
    ids = torch.tensor(windows, dtype=torch.long)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({"input_ids": ids}, tmp)
    tmp.replace(path)  # atomic: a killed run never leaves a truncated cache entry
    return CalibrationSet(ids, fp, meta)
