"""Recipes: every shipped recipe validates; malformed ones give one line naming file:line and field, exit 2."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from quantkit.errors import UserError
from quantkit.recipe.loader import load_recipe

GOOD = """\
name: t
model:
  source: /nonexistent/model
calibration:
  num_samples: 4
  seq_len: 64
targets:
  - name: fp8-dynamic
    format: fp8
"""

# (recipe text, substrings the one-line error must contain)
BAD = {
    "misspelt top-level key": (GOOD.replace("calibration:", "calibraton:"),
                               [":4:", "calibraton", "did you mean `calibration`"]),
    "misspelt nested key": (GOOD.replace("num_samples", "num_sample"), [":5:", "calibration.num_sample",
                                                                        "did you mean `num_samples`"]),
    "misspelt target option": (GOOD + "    schem: dynamic\n", [":10:", "targets[0].schem", "did you mean `scheme`"]),
    "unknown format": (GOOD.replace("format: fp8", "format: fp9"), [":9:", "targets[0].format", "fp8"]),
    "bad enum value": (GOOD + "    scheme: dynamc\n", [":10:", "targets[0].scheme", "dynamic", "static"]),
    "wrong type": (GOOD.replace("num_samples: 4", "num_samples: many"), [":5:", "calibration.num_samples",
                                                                         "integer"]),
    "negative number": (GOOD.replace("seq_len: 64", "seq_len: -1"), [":6:", "calibration.seq_len"]),
    "missing name": (GOOD.replace("name: t\n", ""), ["name", "required"]),
    "missing model source": (GOOD.replace("  source: /nonexistent/model\n", "  dtype: float32\n"),
                             ["model.source", "required"]),
    "bad dtype": (GOOD.replace("  source: /nonexistent/model\n", "  source: x\n  dtype: fp64\n"),
                  [":4:", "model.dtype", "float32"]),
    "duplicate target names": (GOOD + "  - name: fp8-dynamic\n    format: fp8\n", ["targets", "used twice"]),
    "invalid YAML": (GOOD + "  - name: [unclosed\n", ["invalid YAML"]),
    "not a mapping": ("- just\n- a list\n", ["mapping"]),
    "missing extends base": ("extends: nowhere.yaml\n" + GOOD, [":1:", "extends", "nowhere.yaml"]),
    "bad target name": (GOOD.replace("- name: fp8-dynamic", "- name: 'has space'"), [":8:", "targets[0].name"]),
    "awq option on a non-AWQ scheme": (GOOD.replace("format: fp8", "format: trtllm\n    scheme: fp8\n"
                                                    "    awq_alpha_step: 0.25"), [":8:", "awq_alpha_step", "int4_awq"]),
    "resmooth scoring on fp8": (GOOD.replace("format: fp8", "format: trtllm\n    scheme: fp8\n"
                                             "    score_as_calibrated: true"), [":8:", "score_as_calibrated", "fp8"]),
}


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_shipped_recipes_validate(recipe):
    r = run_cli("recipe", "validate", f"recipes/{recipe}")
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipe_one_line_exit_2(case, tmp_path):
    text, needles = BAD[case]
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    r = run_cli("recipe", "validate", str(f))
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # one line, no traceback
    assert lines[0].startswith(f"error: {f}")
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_debug_shows_traceback(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(BAD["misspelt top-level key"][0])
    r = run_cli("--debug", "recipe", "validate", str(f))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_extends_merges_and_child_errors_point_at_child(tmp_path):
    (tmp_path / "base.yaml").write_text(textwrap.dedent("""\
        calibration: {num_samples: 8, seq_len: 128, seed: 3}
        eval: {perplexity: {datasets: [wikitext2], seq_len: 128}}
    """))
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\n" + GOOD.replace("  seq_len: 64\n", ""))
    loaded = load_recipe(child)
    assert loaded.recipe.calibration.num_samples == 4  # child wins
    assert loaded.recipe.calibration.seq_len == 128 and loaded.recipe.calibration.seed == 3  # from base
    assert loaded.recipe.eval.perplexity.datasets == ["wikitext2"]
    child.write_text("extends: base.yaml\n" + GOOD.replace("num_samples", "num_sample"))
    with pytest.raises(UserError) as e:
        load_recipe(child)
    assert f"{child}:6" in e.value.one_line()


def test_extends_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_show_prints_resolved_defaults(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(GOOD)
    r = run_cli("recipe", "show", str(f))
    assert r.returncode == 0, r.stderr
    assert "ignore: null" in r.stdout and "seed: 0" in r.stdout and "trust_remote_code: false" in r.stdout


def test_every_command_has_help():
    for cmd in (["build"], ["recipe", "validate"], ["recipe", "show"], ["model", "import-gguf"], ["store", "list"],
                ["store", "show"], ["store", "verify"], ["report"]):
        r = run_cli(*cmd, "--help")
        assert r.returncode == 0 and "Usage" in r.stdout, cmd
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("quantkit ")
