"""`quantkit build --executor ray:ADDRESS` on a local Ray cluster that the test starts (2 CPUs): the targets run
as Ray tasks, the workers publish, and the manifests equal an in-process build's apart from host and time."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import run_cli
from quantkit.store.store import Store

# Ray >= 2.5x turns on token auth for new clusters and writes a token into $HOME; a throwaway test cluster
# needs none (research/cpu-trials.md, Step 8). Set before ray is imported; subprocesses inherit it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# One math thread everywhere (Ray gives a 1-CPU task OMP_NUM_THREADS=1): the in-process reference then does
# the same float arithmetic as the workers, so their files and perplexities can be compared exactly.
SAME_MATH = {"OMP_NUM_THREADS": "1"}
RUN_SPECIFIC = {"created_at", "host", "build"}  # when, where and how long: the only fields allowed to differ
TIMING_KEYS = {"wall_s", "load_s", "tokens_per_s"}


def _recipe(tmp: Path, model: Path) -> Path:
    f = tmp / "tiny-ray.yaml"
    f.write_text(f"""\
name: tiny-ray
model: {{source: {model}, dtype: float32}}
calibration: {{dataset: c4, num_samples: 4, seq_len: 64, seed: 0}}
targets:
  - {{name: fp8-dynamic, format: fp8, scheme: dynamic, resources: {{num_cpus: 1}}}}
  - {{name: fp8-static, format: fp8, scheme: static, resources: {{num_cpus: 1}}}}
eval: {{perplexity: {{datasets: [wikitext2], seq_len: 64, max_windows: 4}}}}
""")
    return f


def _comparable(m: dict) -> dict:
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in TIMING_KEYS}
        return x

    return strip({k: v for k, v in m.items() if k not in RUN_SPECIFIC})


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.mark.slow  # a local Ray cluster plus worker processes that each import torch: well over 20 s on 2 cores
def test_ray_build_equals_in_process_build(tiny_llama, tmp_path, ray_cluster):
    recipe = _recipe(tmp_path, tiny_llama)
    local, remote = tmp_path / "store-inprocess", tmp_path / "store-ray"
    r = run_cli("build", str(recipe), "--store", str(local), "--json", "--report-dir", str(tmp_path / "r1"),
                env=SAME_MATH)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("build", str(recipe), "--store", str(remote), "--json", "--report-dir", str(tmp_path / "r2"),
                "--executor", f"ray:{ray_cluster}", env=SAME_MATH)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert [i.split(".")[1] for i in result["built"]] == ["baseline", "fp8-dynamic", "fp8-static"]
    assert "submitted to Ray" in r.stderr and "published" in r.stderr
    a, b = Store(str(local)), Store(str(remote))
    assert a.ids() == b.ids() and len(a.ids()) == 3
    for i in a.ids():
        ma, mb = a.get(i), b.get(i)
        assert _comparable(ma) == _comparable(mb), i
        if ".baseline." not in i:  # built and published by a Ray worker process, not by the CLI
            assert ma["build"]["argv"][0].endswith("quantkit/cli.py")
            assert "/ray/" in mb["build"]["argv"][0], mb["build"]["argv"]  # ray/_private/workers/default_worker.py
    assert b.verify() == []
    # the calibration set was sampled once, by the driver
    assert [s["stage"] for s in result["stages"]].count("calibration set (once)") == 1
    # a second Ray build is all cache hits, nothing submitted
    r = run_cli("build", str(recipe), "--store", str(remote), "--json", "--executor", f"ray:{ray_cluster}",
                "--report-dir", str(tmp_path / "r3"))
    assert r.returncode == 0 and json.loads(r.stdout)["built"] == [] and "submitted" not in r.stderr


def test_resources_do_not_change_the_artifact_identity():
    from quantkit.executors.ray_executor import task_options
    from quantkit.formats import get_format

    fp8 = get_format("fp8").Options
    plain = fp8(name="a", format="fp8", scheme="dynamic")
    gpu = fp8(name="a", format="fp8", scheme="dynamic", resources={"num_gpus": 1, "node_pool_a100": 1})
    assert plain.identity() == gpu.identity()
    assert task_options(gpu.resources) == {"num_cpus": 1, "num_gpus": 1.0, "resources": {"node_pool_a100": 1.0}}


def test_unknown_executor_is_one_line(tiny_llama, tmp_path):
    r = run_cli("build", str(_recipe(tmp_path, tiny_llama)), "--executor", "dask")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "ray[:ADDRESS]" in r.stderr


@pytest.mark.slow  # the local Ray cluster and its workers, as above
def test_worker_with_other_library_versions_refuses_in_one_line(tiny_llama, tmp_path, ray_cluster):
    """The driver plans under compressed-tensors 0.0.1 (a distribution record only it sees, first on its path);
    the workers have the real one: each refuses to build, and nothing is published under the wrong key."""
    info = tmp_path / "driver-site" / "compressed_tensors-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: compressed-tensors\nVersion: 0.0.1\n")
    store = tmp_path / "store"
    env = {"PYTHONPATH": os.pathsep.join([str(info.parent), os.environ.get("PYTHONPATH", "")])}
    r = run_cli("build", str(_recipe(tmp_path, tiny_llama)), "--store", str(store), "--executor",
                f"ray:{ray_cluster}", "--report-dir", str(tmp_path / "r"), env=env)
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "library versions differ from the driver's plan: compressed-tensors" in last and "(driver 0.0.1)" in last
    assert [i.split(".")[1] for i in Store(str(store)).ids()] == ["baseline"]  # built by the driver itself
