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


def device_label(device: str) -> str:
    """"cuda:<GPU name>" for CUDA (a speed record must say which GPU made it), else the device as given."""
    if device != "cuda":
        return device
    import torch

    return f"cuda:{torch.cuda.get_device_name(0)}"


def speed_record(described: dict, batches: dict, spec, peak_mb: float | None, peak_kind: str, **extra) -> dict:
    """The throughput record every engine returns: what made it (`described`), per-batch numbers, the peak
    memory and the protocol it ran."""
    return {**described, "serving_engine": False, "batches": batches, **extra,
            "peak_memory_mb": None if peak_mb is None else round(peak_mb, 1),
            "peak_memory_kind": peak_kind if peak_mb is not None else None,
            "prompt_len": spec.prompt_len, "gen_len": spec.gen_len, "repetitions": spec.repetitions,
            "warmup": spec.warmup}
