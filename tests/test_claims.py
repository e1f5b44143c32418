"""Claims that hold: tail latencies only from enough samples, a dense baseline's size at the dtype it ran in,
and the committed benchmark READMEs say what their reports hold."""
from __future__ import annotations

import json
import re

from conftest import ROOT
from quantkit import report
from quantkit.evaluation.latency import MIN_SAMPLES_P99, ttft_summary


def test_ttft_p99_only_from_enough_samples():
    few = ttft_summary([0.3, 0.1, 0.2])
    assert few == {"ttft_p50_s": 0.2, "ttft_samples": 3}  # no p99 from 3 samples
    many = ttft_summary([i / 1000 for i in range(1, MIN_SAMPLES_P99 + 1)])
    assert many["ttft_samples"] == 100 and many["ttft_p50_s"] == 0.0505 and 0.098 < many["ttft_p99_s"] <= 0.1


def _manifest(target: str, fmt: str, info: dict, metrics: dict, total: int = 0) -> dict:
    return {"id": f"r.{target}", "recipe": {"name": "r"}, "target": {"name": target, "format": fmt, "scheme": "-"},
            "engine": "transformers", "source": {"fingerprint": "f"}, "info": info, "metrics": metrics,
            "total_size": total, "files": []}


def test_baseline_size_is_its_bytes_at_the_dtype_it_ran_in():
    """An fp32 checkpoint evaluated in bf16 (the H100 run) is a bf16 model: 2 bytes per parameter."""
    info = {"param_count": 134_515_008, "weight_bytes": 538_090_408, "bytes_16bit": 269_030_016, "dtype": "auto",
            "quality_reference": True, "dense_reference": True}
    ppl = {"wikitext2": {"ppl": 32.9, "key": "k", "protocol": "p", "seq_len": 512, "windows": 24}}
    gpu = _manifest("baseline", "baseline", info, {"perplexity": {"wikitext2": {**ppl["wikitext2"],
                                                                                 "dtype": "bfloat16"}}})
    cpu = _manifest("baseline", "baseline", info, {"perplexity": {"wikitext2": {**ppl["wikitext2"],
                                                                                 "dtype": "float32"}}})
    g, = report.rows([gpu])
    c, = report.rows([cpu])
    assert g["size_mb"] == 269.0 and g["x_vs_16bit"] == 1.0 and "bfloat16" in g["size_basis"]
    assert c["size_mb"] == 538.1 and c["x_vs_16bit"] == 0.5 and "float32" in c["size_basis"]
    assert "Size of `baseline`: weights at bfloat16, the dtype it ran in" in report.to_markdown([g])


def test_benchmark_readmes_count_what_their_reports_hold():
    for readme in sorted((ROOT / "docs" / "benchmarks").glob("*/README.md")):
        if not (readme.parent / "report.json").exists():  # benchmarks that are not build reports
            continue
        rows = json.loads((readme.parent / "report.json").read_text())
        for claim in re.findall(r"holds (\d+) rows", " ".join(readme.read_text().split())):
            assert int(claim) == len(rows), (readme, claim, len(rows))
    cpu = " ".join((ROOT / "docs" / "benchmarks" / "cpu-2core" / "README.md").read_text().split())
    assert re.search(r"holds \d+ rows", cpu)  # the demo's README states its count, which the loop above checks
