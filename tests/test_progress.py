"""The build prints each artifact's row as soon as it is done, with the time left, and the cached re-run prints
the same rows from the store (tiny random Llama, real FP8 quantization and perplexity)."""
from __future__ import annotations

import json
import re

from conftest import run_cli

ROW = re.compile(r"^\[(\d+)/(\d+)\] (\S+) .*$", re.M)


def _recipe(tmp_path, model):
    f = tmp_path / "progress.yaml"
    f.write_text(f"""\
name: progress
model: {{source: {model}, dtype: float32}}
calibration: {{dataset: c4, num_samples: 4, seq_len: 64, seed: 0}}
targets:
  - {{name: fp8-dynamic, format: fp8, scheme: dynamic}}
  - {{name: fp8-static, format: fp8, scheme: static}}
eval: {{perplexity: {{datasets: [wikitext2, c4], seq_len: 64, max_windows: 2}}}}
store: {{uri: {tmp_path / "store"}}}
""")
    return f


def test_rows_stream_in_order_with_time_left_then_from_store(tiny_llama, tmp_path):
    recipe = _recipe(tmp_path, tiny_llama)
    r = run_cli("build", str(recipe), "--json", "--report-dir", str(tmp_path / "r1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"^3 to build, 0 in store; estimated \d+", r.stderr, re.M), r.stderr[-2000:]
    lines = ROW.findall(r.stderr)
    assert [(int(i), int(n), name) for i, n, name in lines] == [
        (1, 3, "baseline"), (2, 3, "fp8-dynamic"), (3, 3, "fp8-static")]
    rows = {row["target"]: row for row in json.loads(r.stdout)["rows"]}
    printed = {m.group(3): m.group(0) for m in ROW.finditer(r.stderr)}
    for name, line in printed.items():  # the streamed numbers are the final table's
        for ds in ("c4", "wikitext2"):
            assert f"ppl {ds} {rows[name]['ppl'][ds]['ppl']:.3f}" in line, line
    c4 = rows["fp8-static"]["ppl"]["c4"]
    assert c4["change_se_pct"] > 0  # per-window NLLs of artifact and baseline give the change a standard error
    assert f"({c4['change_pct']:+.2f} ±{c4['change_se_pct']:.2f} %)" in printed["fp8-static"]
    assert "left" in printed["baseline"] and "left" in printed["fp8-dynamic"]
    assert "left" not in printed["fp8-static"]  # nothing left after the last one

    again = run_cli("build", str(recipe), "--report-dir", str(tmp_path / "r2"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "to build" not in again.stderr  # all cached: no estimate to give
    assert [m.group(3) for m in ROW.finditer(again.stderr)] == ["baseline", "fp8-dynamic", "fp8-static"]
    assert all("left" not in m.group(0) for m in ROW.finditer(again.stderr))
