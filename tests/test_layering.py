"""Layering: formats produce, engines and checks measure; the orchestrator and the report name no format or
engine; engines and checks are found by registration (including a third-party entry point)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "quantkit"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_no_format_module_imports_evaluation():
    offenders = {p.relative_to(ROOT).as_posix(): sorted(m for m in _imports(p) if m.startswith("quantkit.evaluation"))
                 for p in (PKG / "formats").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_scan_sees_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from quantkit.evaluation.perplexity import perplexity\n")
    assert "quantkit.evaluation.perplexity" in _imports(f)


def _names() -> set[str]:
    from quantkit.evaluation.engines import engine_names
    from quantkit.formats import format_names, reference_format

    return {*format_names(), reference_format().name, *engine_names()}


def _string_literals(path: Path) -> set[str]:
    return {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)}


@pytest.mark.parametrize("module", ["build.py", "report.py", "gates.py", "plot.py"])
def test_orchestrator_and_report_name_no_format_or_engine(module):
    names = _names()
    assert {"baseline", "gguf", "trtllm", "llama.cpp", "transformers"} <= names  # the scan knows what to look for
    assert sorted(_string_literals(PKG / module) & names) == []


def test_cli_special_cases_no_reference_format_or_engine():
    from quantkit.evaluation.engines import engine_names
    from quantkit.formats import reference_format

    # (cli.py may say "fp8" as a KV-cache dtype; what it must not do is branch on the baseline or an engine)
    assert sorted(_string_literals(PKG / "cli.py") & {reference_format().name, *engine_names()}) == []


def _plugin(tmp_path: Path, name: str, target: str) -> Path:
    """A distribution on sys.path whose entry point adds an engine (as a third-party package would)."""
    site = tmp_path / "site"
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[quantkit.engines]\n{name} = {target}\n")
    return site


def _run(code: str, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_engine_entry_point_registers_an_engine(tmp_path):
    site = _plugin(tmp_path, "toy_engine_plugin", "toy_engine_mod")
    (site / "toy_engine_mod.py").write_text(
        "from quantkit.evaluation.engines import register_engine\n"
        "@register_engine\nclass Toy:\n    name = 'toy'\n")
    r = _run("from quantkit.evaluation.engines import get_engine, engine_names\n"
             "print(type(get_engine('toy')).__name__, 'transformers' in engine_names())", site)
    assert r.returncode == 0 and r.stdout.split() == ["Toy", "True"], r.stderr


def test_broken_engine_plugin_is_one_line_and_the_rest_still_load(tmp_path):
    site = _plugin(tmp_path, "broken_plugin", "no_such_module_xyz")
    r = _run("from quantkit.evaluation.engines import get_engine\nprint(get_engine('transformers').name)", site)
    assert r.returncode == 0 and r.stdout.strip() == "transformers", r.stderr
    lines = [x for x in r.stderr.splitlines() if "broken_plugin" in x]
    assert len(lines) == 1 and "failed to load" in lines[0] and "no_such_module_xyz" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


class _Console:
    def __init__(self):
        self.lines = []

    def print(self, *a, **k):
        self.lines.append(" ".join(map(str, a)))


def test_perplexity_agreement_check_passes_and_fails_on_the_number(tmp_path):
    """The cross-check the trtllm format declares: the measured record with the same windows key is compared."""
    from quantkit.errors import UserError
    from quantkit.evaluation.checks import Subject, run_checks
    from quantkit.formats import Check

    metrics = {"perplexity": {"wikitext2": {"ppl": 20.0, "key": "k1"}}}
    subject = Subject(ctx=None, engine="modelopt-dequant", path=tmp_path, entry=".", metrics=metrics)
    params = {"dataset": "wikitext2", "seq_len": 64, "max_windows": 2, "key": "k1", "rel_tol": 0.005,
              "reference": "ModelOpt fake-quant"}
    out = run_checks(subject, [Check("perplexity-agrees", {**params, "expected_ppl": 20.05})], _Console())
    rec = out["perplexity-agrees"]
    assert rec["ppl"] == 20.0 and rec["relative_difference"] == pytest.approx(20.0 / 20.05 - 1, abs=1e-6)
    with pytest.raises(UserError, match=r"differs from ModelOpt fake-quant ppl 20.2000 by -0.99%"):
        run_checks(subject, [Check("perplexity-agrees", {**params, "expected_ppl": 20.2})], _Console())


def test_unknown_check_names_the_known_ones():
    from quantkit.evaluation.checks import get_check

    with pytest.raises(KeyError, match="llama-perplexity"):
        get_check("no-such-check")
