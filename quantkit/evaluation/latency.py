"""Latency summaries shared by the engines. A percentile is reported only when enough samples back it: a
"p99" of 3 repetitions is just their maximum, so it is left out rather than shown as if it were a tail."""
from __future__ import annotations

import statistics

MIN_SAMPLES_P99 = 100  # one sample in a hundred is the tail: fewer samples cannot locate it


def ttft_summary(samples: list[float]) -> dict:
    """Median time to first token, the sample count, and the p99 when there are at least MIN_SAMPLES_P99."""
    out = {"ttft_p50_s": round(statistics.median(samples), 4), "ttft_samples": len(samples)}
    if len(samples) >= MIN_SAMPLES_P99:
        out["ttft_p99_s"] = round(statistics.quantiles(samples, n=100, method="inclusive")[98], 4)
    return out
