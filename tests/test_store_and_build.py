"""Store and build on a tiny random Llama: verify catches a flipped byte, a re-run is a cache hit, manifests
hold every promised field. (A killed publish: tests/test_store_trust.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from quantkit.store.store import Store

MANIFEST_FIELDS = {"id", "key", "created_at", "host", "recipe", "target", "engine", "entry", "source",
                   "calibration", "versions", "info", "metrics", "build", "files", "total_size", "schema"}


def _recipe(tmp_path: Path, model: Path, store: Path, targets: str) -> Path:
    f = tmp_path / "tiny.yaml"
    f.write_text(f"""\
name: tiny
model: {{source: {model}, dtype: float32}}
calibration: {{dataset: c4, num_samples: 4, seq_len: 64, seed: 0}}
targets:
{targets}
eval: {{perplexity: {{datasets: [wikitext2, c4], seq_len: 64, max_windows: 4}}}}
store: {{uri: {store}}}
""")
    return f


FP8_BOTH = "  - {name: fp8-dynamic, format: fp8, scheme: dynamic}\n  - {name: fp8-static, format: fp8, scheme: static}"


@pytest.fixture(scope="module")
def built(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("build")
    store = tmp / "store"
    recipe = _recipe(tmp, tiny_llama, store, FP8_BOTH)
    r = run_cli("build", str(recipe), "--json", "--report-dir", str(tmp / "reports"))
    assert r.returncode == 0, r.stderr[-3000:]
    return recipe, store, json.loads(r.stdout), tmp


def test_build_publishes_baseline_and_targets_with_full_manifests(built):
    recipe, store, result, tmp = built
    assert len(result["built"]) == 3 and result["cached"] == []
    manifests = list(Store(str(store)).list())
    assert sorted(m["target"]["name"] for m in manifests) == ["baseline", "fp8-dynamic", "fp8-static"]
    for m in manifests:
        assert MANIFEST_FIELDS <= set(m), MANIFEST_FIELDS - set(m)
        assert m["recipe"]["name"] == "tiny" and len(m["recipe"]["hash"]) == 64
        assert len(m["source"]["fingerprint"]) == 64
        assert {"torch", "transformers", "quantkit", "python"} <= set(m["versions"])
        for ds in ("wikitext2", "c4"):
            met = m["metrics"]["perplexity"][ds]
            assert met["ppl"] > 1 and met["windows"] == 4 and met["seq_len"] == 64
            for k in ("protocol", "dataset_sha256", "engine", "device", "versions", "tokens_scored", "key"):
                assert k in met
        for f in m["files"]:
            assert len(f["sha256"]) == 64 and f["size"] > 0
    static = next(m for m in manifests if m["target"]["name"] == "fp8-static")
    assert static["calibration"]["num_samples"] == 4 and static["calibration"]["dataset"] == "c4"
    assert static["info"]["quantization_config"]["config_groups"]["group_0"]["input_activations"]["dynamic"] is False
    dyn = next(m for m in manifests if m["target"]["name"] == "fp8-dynamic")
    assert dyn["calibration"] is None  # data-free: not keyed on calibration data
    assert (tmp / "reports" / "report.md").exists() and (tmp / "reports" / "report.json").exists()


def test_rerun_is_a_cache_hit_with_identical_rows(built):
    recipe, store, first, tmp = built
    r = run_cli("build", str(recipe), "--json", "--report-dir", str(tmp / "reports2"))
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads(r.stdout)
    assert again["built"] == [] and len(again["cached"]) == 3
    assert again["rows"] == first["rows"]


def test_store_list_show_verify_and_flipped_byte(built):
    recipe, store, result, tmp = built
    r = run_cli("store", "list", "--json", "--store", str(store))
    listed = json.loads(r.stdout)
    assert r.returncode == 0 and len(listed) == 3
    target = next(m for m in listed if m["target"]["name"] == "fp8-dynamic")["id"]
    r = run_cli("store", "show", target[:20], "--store", str(store))
    assert r.returncode == 0 and json.loads(r.stdout)["id"] == target
    assert run_cli("store", "verify", "--store", str(store)).returncode == 0
    s = Store(str(store))
    big = max(s.get(target)["files"], key=lambda f: f["size"])
    blob = Path(s.blob_path(big["sha256"]))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    try:
        r = run_cli("store", "verify", target, "--store", str(store))
        assert r.returncode == 1 and "sha256 mismatch" in r.stdout and big["path"] in r.stdout
    finally:
        data[len(data) // 2] ^= 0x01
        blob.write_bytes(bytes(data))
    assert run_cli("store", "verify", "--store", str(store)).returncode == 0


def test_unknown_target_and_missing_model_are_one_line(tiny_llama, tmp_path):
    recipe = _recipe(tmp_path, tiny_llama, tmp_path / "s", FP8_BOTH)
    r = run_cli("build", str(recipe), "--target", "nope")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "fp8-static" in r.stderr
    recipe = _recipe(tmp_path, tmp_path / "no-such-model", tmp_path / "s", FP8_BOTH)
    r = run_cli("build", str(recipe))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "model.source" in r.stderr
