"""The architecture matrix: tiny random checkpoints of each family (tests/tiny_models.py) go through every
format quantkit builds and each format's engine scores the artifact, on the CPU.

One in-process build per architecture (all its formats share the loaded model and the calibration set); each
(architecture, format) cell is a test marked `arch_cell`, whose outcome conftest writes to the matrix JSON that
scripts/arch_support_table.py turns into README's support table. A cell the architecture table declares
unsupported must be refused by the plan, in one line, before any work.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import run_cli
from quantkit.architectures import read_config, target_problems
from quantkit.errors import UserError
from tiny_models import ARCHS, MOE, NO_GGUF, make_tiny

# format -> (recipe target, engine that scores it, max relative change of the mean NLL against the baseline)
FORMATS = {
    "fp8": ("{name: fp8, format: fp8, scheme: static}", "transformers", 0.03),
    "int8": ("{name: int8, format: int8, scheme: w8a16, algorithm: gptq}", "transformers", 0.03),
    "gptq": ("{name: gptq, format: gptq, group_size: 32}", "transformers", 0.10),
    "awq": ("{name: awq, format: awq, group_size: 32, n_grid: 3}", "transformers", 0.10),
    "trtllm": ("{name: trtllm, format: trtllm, scheme: fp8}", "modelopt-dequant", 0.03),
    "gguf": ("{name: gguf, format: gguf, types: [Q8_0], llama_cpp_ppl_chunks: 0}", "llama.cpp", 0.03),
}
NOT_IN_MATRIX = {(arch, "gguf") for arch in NO_GGUF}  # see tiny_models.NO_GGUF


class _Target:  # what target_problems reads, without loading the recipe
    def __init__(self, name: str, spec: str):
        import yaml

        self.__dict__.update(yaml.safe_load(spec))


def _recipe(root: Path, model: Path, targets: list[str]) -> Path:
    f = root / "recipe.yaml"
    lines = "\n".join(f"  - {t}" for t in targets)
    f.write_text(f"name: tiny-{model.name}\nmodel: {{source: {model}, dtype: float32}}\n"
                 f"calibration: {{dataset: c4, num_samples: 4, seq_len: 64, seed: 0}}\ntargets:\n{lines}\n"
                 f"eval: {{perplexity: {{datasets: [wikitext2], seq_len: 64, max_windows: 2}}}}\n"
                 f"store: {{uri: {root / 'store'}}}\n")
    return f


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_model(request, smollm2, tmp_path_factory):
    """(arch, model dir, store root): one tiny checkpoint per architecture; its cells share the store, so the
    baseline and the calibration set are made once. It borrows the demo model's tokenizer (tiny_models.py), so
    every cell is `slow` (conftest's marker rule): nine architectures x four formats is minutes on 2 cores."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"arch-{arch}")
    return arch, make_tiny(arch, root / arch.replace(".", ""), smollm2), root


def _build(root: Path, model: Path, fmt: str) -> dict[str, dict]:
    from quantkit.build import run_build
    from quantkit.recipe.loader import load_recipe

    cell = root / fmt
    cell.mkdir(exist_ok=True)
    recipe = _recipe(cell, model, [FORMATS[fmt][0]])
    result = run_build(load_recipe(recipe), store=str(root / "store"))
    return {m["target"]["name"]: m for m in result.manifests}


def _nll(m: dict) -> float:
    return math.log(m["metrics"]["perplexity"]["wikitext2"]["ppl"])


HEAVY = {"awq", "trtllm"}  # scale searches / two extra perplexity passes: `make check` leaves them out


@pytest.mark.parametrize("fmt", [pytest.param(f, marks=pytest.mark.slow) if f in HEAVY else f for f in FORMATS])
def test_cell(arch_model, fmt, request):
    arch, model, root = arch_model
    spec, engine, tolerance = FORMATS[fmt]
    if (arch, fmt) in NOT_IN_MATRIX:
        pytest.skip("not part of the matrix: see NOT_IN_MATRIX")
    request.node.user_properties.append(("arch_cell", {"arch": arch, "format": fmt, "engine": engine}))
    if target_problems(read_config(model), [_Target(fmt, spec)]):
        # declared unsupported: the plan refuses it in one line, before any work
        with pytest.raises(UserError) as e:
            _build(root, model, fmt)
        line = e.value.one_line()
        assert line.startswith("error: target ") and "does not support" in line and "\n" not in line
        assert not (root / "store" / "manifests").exists() or not any((root / "store" / "manifests").glob(
            f"*.{fmt}.*"))
        request.node.user_properties.append(("arch_cell_status", "unsupported"))
        return
    built = _build(root, model, fmt)
    (m,) = [m for name, m in built.items() if name == fmt or name.startswith(fmt + "-")]
    assert m["engine"] == engine
    assert m["sanity"]["status"] == "skipped" and "random weights" in m["sanity"]["reason"]
    base, got = _nll(built["baseline"]), _nll(m)
    assert math.isfinite(got) and abs(got - base) / base < tolerance, (arch, fmt, base, got)
    if arch in MOE and fmt not in ("trtllm", "gguf"):
        cov = m["info"]["expert_calibration"]  # every expert projection saw calibration tokens
        assert cov["experts"] == 2 * 4 and cov["uncalibrated"] == [] and cov["min_inputs_per_projection"] > 0
        assert any("mlp\\.gate" in p for p in m["info"]["ignore"])  # routers stay unquantized
    request.node.user_properties.append(("arch_cell_status", "supported"))


def test_validate_names_the_missing_support_in_one_line(tiny_llama, tmp_path, request):
    request.node.user_properties.append(("arch_cell", {"arch": "mixtral", "format": "awq",
                                                       "engine": FORMATS["awq"][1]}))
    model = make_tiny("mixtral", tmp_path / "mixtral", tiny_llama)  # validation reads the config: any tokenizer
    recipe = _recipe(tmp_path, model, [FORMATS["awq"][0]])
    r = run_cli("recipe", "validate", str(recipe))
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "target awq" in line and "Mixtral" in line and "asymmetric" in line
    request.node.user_properties.append(("arch_cell_status", "unsupported"))
