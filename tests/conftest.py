"""Shared fixtures. Data comes from ../shared/data (or $QUANTKIT_DATA); nothing touches the network."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from ci_strict import pytest_runtest_makereport  # noqa: F401 - a hook: with CI set, missing set-up fails

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("QUANTKIT_DATA", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
DATA = Path(os.environ["QUANTKIT_DATA"])
# `make test` runs pytest-xdist workers (-n 2 on CI's 2 cores): one math thread per worker (torch, and every
# process it starts inherits it), so two workers do not fight over the cores with spinning OpenMP threads.
# Set before anything imports torch; an explicit setting wins.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, _threads)
SMOLLM2 = ROOT / "models" / "smollm2-135m-instruct"


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None,
            fresh: bool = False) -> subprocess.CompletedProcess:
    """Run the real `quantkit` command in a process of its own (exit code, stdout and stderr as a user sees them).
    By default the process is forked from a server that has already imported torch and friends
    (tests/warm_cli.py); fresh=True, or an environment that changes what happens at interpreter start (PYTHONPATH,
    thread counts), starts a new interpreter instead."""
    if not fresh and not any(k == "PYTHONPATH" or k.endswith("_NUM_THREADS") for k in env or {}):
        import warm_cli

        return warm_cli.run(args, cwd or ROOT, {**os.environ, **(env or {})})
    return subprocess.run([sys.executable, "-m", "quantkit.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env={**os.environ, **(env or {})})


def pytest_collection_modifyitems(config, items):
    """The marker rule (README, "Tests"): `slow` = needs the real model or a heavy quantization run; `make check`
    (-m "not slow") must stay under 3 minutes on 2 cores. A test whose fixtures reach `smollm2` (directly or
    through another fixture) is marked here, so it cannot be forgotten; mark other heavy tests (a real
    calibration over more than a tiny model, anything over ~20 s on 2 cores) with @pytest.mark.slow by hand."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    if hasattr(config, "workerinput"):  # an xdist worker: they collect, the controller hands out their order
        heaviest_files_first(items)


# CPU seconds per file, measured one file at a time with one thread (a worker's share) on the 2-core machine
# (docs/benchmarks/cpu-2core/tests.md, 2026-11-30 evening): only the order is taken from them.
MEASURED_CPU_S = {"tests/test_formats_llmc.py": 310, "tests/test_gguf.py": 149, "tests/test_trtllm.py": 136,
                  "tests/test_gguf_import_archs.py": 131, "tests/test_arch_matrix.py": 107,
                  "tests/test_smollm2.py": 62, "tests/test_scale.py": 53, "tests/test_ray_executor.py": 33}


def heaviest_files_first(items: list) -> None:
    """`make test` (pytest-xdist, --dist loadfile --no-loadscope-reorder): a file's tests stay on one worker, so
    module-scoped fixtures (a shared build, converted GGUFs) are made once, not once per worker, and files are
    handed out in collection order, each to the first worker with (almost) nothing left. The costliest files go
    first (measured, above), so the longest never starts last; then the files with the most `slow` tests; the
    fast lane's short files fill in at the end while the other worker finishes."""
    slow_in: dict[str, int] = {}
    for item in items:
        f = item.nodeid.split("::")[0]
        slow_in[f] = slow_in.get(f, 0) + (item.get_closest_marker("slow") is not None)

    def cost(item) -> tuple[int, int]:
        f = item.nodeid.split("::")[0]
        return -MEASURED_CPU_S.get(f, 0), -slow_in[f]

    items.sort(key=cost)  # stable: a file's order is kept


@pytest.fixture(scope="session")
def smollm2() -> Path:
    if not (SMOLLM2 / "config.json").exists():
        pytest.fail(f"{SMOLLM2} missing: run `make model` (make test does this first)")
    return SMOLLM2


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on a free loopback port; AWS_* point every s3fs client (ours and subprocesses') at it."""
    from loopback_s3 import moto_server

    try:
        with moto_server() as url:
            yield url
    except RuntimeError as e:
        pytest.fail(str(e))


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path) -> str:
    """A store that does not exist yet: a local directory, or a bucket on the loopback S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    import uuid

    request.getfixturevalue("s3_endpoint")
    return f"s3://qk-{uuid.uuid4().hex[:12]}/team/store"


def make_tiny_llama(out: Path) -> Path:
    """A tiny random Llama with a real byte-level BPE tokenizer trained on C4 text (fast, offline)."""
    import json

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    docs = [json.loads(line)["text"] for line in (DATA / "c4" / "c4-train-sample.jsonl").read_text().splitlines()[:200]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    from quantkit.sanity import declare_random_weights

    declare_random_weights(out, "tests/conftest.py tiny_llama")
    return out


# A build calls gc.collect() after each target (quantkit/util.py release_memory); in this process a full
# collection walks every object of torch, transformers and llm-compressor: ~0.4 CPU-s a call, a third of a tiny
# build. Objects alive once a library is imported are moved out of the collector's sight (gc.freeze); garbage
# made later, the builds' models included, is collected as before. Frozen only right after a full collection,
# when many modules came in, so no garbage of a test is frozen with them.
_frozen_at = 0


def _freeze_imported() -> None:
    global _frozen_at
    if len(sys.modules) - _frozen_at > 200:
        import gc

        gc.collect()
        gc.freeze()
        _frozen_at = len(sys.modules)


def pytest_collection_finish(session):
    _freeze_imported()


@pytest.hookimpl(trylast=True)  # after the test's own fixtures are torn down
def pytest_runtest_teardown(item, nextitem):
    _freeze_imported()


# The architecture matrix (tests/test_arch_matrix.py): each cell test records {arch, format, engine} and its
# status; the outcomes are written as JSON for scripts/arch_support_table.py (README's support table).
_ARCH_CELLS: list[dict] = []


def pytest_runtest_logreport(report):
    props = dict(report.user_properties)
    if "arch_cell" not in props or (report.when != "call" and report.passed):
        return
    status = props.get("arch_cell_status", "failed") if report.passed else "failed"
    _ARCH_CELLS.append({**props["arch_cell"], "test": report.nodeid, "status": status,
                        "outcome": report.outcome, "duration_s": round(report.duration, 2)})


def pytest_sessionfinish(session, exitstatus):
    if _ARCH_CELLS and not hasattr(session.config, "workerinput"):  # under xdist the controller sees every cell
        import json

        out = Path(os.environ.get("QUANTKIT_ARCH_MATRIX_JSON", ROOT / ".pytest_cache" / "arch-matrix.json"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_ARCH_CELLS, indent=1))
