"""The recipe schema (pydantic). Target options are validated by each format's own model (formats/)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    source: str = Field(description="local HF dir, hub id (org/name), or a .gguf file")
    revision: str | None = Field(None, description="hub commit/tag; required for hub ids")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    sanity_check: bool = Field(True, description="check the baseline is a working model before building "
                               "(quantkit/sanity.py); false only for a model known to need it")


class CalibrationSpec(Strict):
    dataset: str = Field("c4", description="a name defined in calibration/*.yaml, or a .txt/.jsonl/.parquet path")
    split: str = "train"
    path: str | None = Field(None, description="local file overriding where the dataset is read from")
    text_field: str = "text"
    num_samples: int = Field(128, ge=1)
    seq_len: int = Field(2048, ge=16)
    seed: int = 0


class PerplexitySpec(Strict):
    datasets: list[str] = Field(default_factory=lambda: ["wikitext2", "c4"])
    seq_len: int = Field(2048, ge=16)
    max_windows: int | None = Field(None, ge=1)
    batch_size: int = Field(1, ge=1)


class ThroughputSpec(Strict):
    prompt_len: int = Field(128, ge=1)
    gen_len: int = Field(32, ge=1)
    batch_sizes: list[int] = Field(default_factory=lambda: [1])
    repetitions: int = Field(3, ge=1)
    warmup: int = Field(1, ge=0)
    threads: int | None = Field(None, ge=1, description="CPU threads (default: all cores)")


class EvalSpec(Strict):
    perplexity: PerplexitySpec | None = Field(default_factory=PerplexitySpec)
    throughput: ThroughputSpec | None = None


class GateSpec(Strict):
    """Limits an artifact must meet; a failing artifact is still published (as evidence), marked failed."""

    max_ppl_increase_pct: float | None = None
    min_decode_speedup: float | None = None
    max_size_gb: float | None = None


class StoreSpec(Strict):
    uri: str = "./model-store"
    options: dict[str, Any] = Field(default_factory=dict, description="fsspec storage options for a remote uri, "
                                    "e.g. {endpoint_url: ..., client_kwargs: {region_name: ...}}; credentials "
                                    "belong in the environment (AWS_ACCESS_KEY_ID, ...), not in recipes")


class TargetSpec(BaseModel):
    """Common fields of every target; each format adds its own options (extra keys checked per format)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    format: str


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: ModelSpec
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    targets: list[TargetSpec] = Field(default_factory=list)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    store: StoreSpec = Field(default_factory=StoreSpec)
    gates: GateSpec | None = None
    baseline: bool = Field(True, description="evaluate the unquantized model as the comparison row")

    @field_validator("targets")
    @classmethod
    def _unique_names(cls, targets: list[TargetSpec]) -> list[TargetSpec]:
        seen: set[str] = set()
        for t in targets:
            if t.name in seen:
                raise ValueError(f"target name {t.name!r} is used twice; target names must be unique")
            seen.add(t.name)
        return targets


def dump(obj: BaseModel) -> dict[str, Any]:
    return obj.model_dump(mode="json")
