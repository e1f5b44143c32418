"""The recipe schema (pydantic). Target options are validated by each format's own model (formats/)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    source: str = Field(description="local HF dir, hub id (org/name), a .gguf file, or dummy:CONFIG")
    revision: str | None = Field(None, description="hub commit/tag; required for hub ids")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    # scale (quantkit/placement.py): where the weights live while a target is made, and how many GPUs calibrate
    layers: int | None = Field(None, ge=1, le=512, description="dummy sources: number of decoder layers")
    offload: Literal["auto", "none", "cpu", "disk"] = Field(
        "auto", description="calibrated targets: weights in host RAM (cpu), on disk (disk), or as planned (auto)")
    offload_dir: str | None = Field(None, description="a writable directory for `offload: disk`")
    gpus: int | Literal["auto"] = Field(1, description="GPUs that calibrate together (distributed oneshot)")

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 64:
            raise ValueError("gpus must be between 1 and 64, or auto")
        return v

    @model_validator(mode="after")
    def _layers_need_dummy(self) -> "ModelSpec":
        if self.layers is not None and not self.source.startswith("dummy:"):
            raise ValueError("layers applies to dummy sources only (source: dummy:CONFIG)")
        return self


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
