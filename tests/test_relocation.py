"""Keys depend on bytes, never on where files sit (issue 15): the same recipe built again with its data and model
copied to other directories, against the same store, produces and measures nothing; one changed byte of one
dataset re-measures exactly the measurements that read it."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

from rich.console import Console

from conftest import DATA
from quantkit.build import run_build
from quantkit.calibration import load_texts
from quantkit.recipe.loader import load_recipe
from quantkit.store.store import Store

FILES = ("c4/c4-validation-sample.jsonl", "wikitext2/wikitext-2-raw-v1.test.jsonl")  # what the evaluation reads


def _place(tiny_llama: Path, where: Path, store: Path) -> Path:
    """Data, model and recipe under `where`; the store is shared."""
    for rel in FILES:
        (where / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(DATA / rel, where / "data" / rel)
    shutil.copytree(tiny_llama, where / "model")
    recipe = where / "recipe" / "moved.yaml"
    recipe.parent.mkdir()
    recipe.write_text(f"""\
name: moved
model: {{source: ../model}}
targets:
  - {{name: fp8-dynamic, format: fp8, scheme: dynamic}}
eval: {{perplexity: {{datasets: [wikitext2, c4], seq_len: 64, max_windows: 2}}}}
store: {{uri: {store}}}
""")
    return recipe


def _build(recipe: Path, monkeypatch) -> tuple[object, str]:
    monkeypatch.setenv("QUANTKIT_DATA", str(recipe.parents[1] / "data"))
    load_texts.cache_clear()  # each CLI build is a process of its own; here they share one
    log = io.StringIO()
    result = run_build(load_recipe(recipe), console=Console(file=log, width=200))
    return result, log.getvalue()


def _evals(store: Store) -> dict[str, dict[str, str]]:
    """artifact id -> dataset -> key of its perplexity measurement (manifest and eval records merged)."""
    return {i: {d: m["key"] for d, m in store.get(i)["metrics"]["perplexity"].items()} for i in store.ids()}


def test_moved_data_and_model_are_cache_hits_and_a_changed_byte_remeasures_its_dataset(tiny_llama, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))  # no eval windows from earlier tests
    store = tmp_path / "store"
    first, _ = _build(_place(tiny_llama, tmp_path / "a", store), monkeypatch)
    assert len(first.built) == 2 and first.cached == []
    st = Store(str(store))
    measured = _evals(st)
    records = {i: st.eval_files(i) for i in st.ids()}

    shutil.rmtree(tmp_path / "a")  # nothing may still be read from the first place
    moved = _place(tiny_llama, tmp_path / "b" / "deeper", store)
    again, log = _build(moved, monkeypatch)
    assert again.built == [] and sorted(again.cached) == sorted(first.built)
    assert "measuring" not in log and _evals(st) == measured
    assert {i: st.eval_files(i) for i in st.ids()} == records
    provenance = st.get(first.built[1])["metrics"]["perplexity"]["c4"]["origin"]  # where it was read, as a record
    assert provenance.startswith(str(tmp_path / "a"))

    wiki = tmp_path / "b" / "deeper" / "data" / FILES[1]
    raw = bytearray(wiki.read_bytes())
    at = raw.index(b"Robert Boulter is an English film")
    raw[at] = ord("r")  # one byte, inside the first window's text
    wiki.write_bytes(bytes(raw))
    third, log = _build(moved, monkeypatch)
    assert third.built == []
    now = _evals(st)
    for i in st.ids():
        assert now[i]["c4"] == measured[i]["c4"]  # did not read the changed file: not measured again
        assert now[i]["wikitext2"] != measured[i]["wikitext2"]  # read it: measured again, under a new key
        assert len(st.eval_files(i)) == len(records[i]) + 1
    assert log.count("measuring wikitext2") == 2 and "measuring c4" not in log and "c4: ppl" not in log
