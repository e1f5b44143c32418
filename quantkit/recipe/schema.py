"""The recipe schema (pydantic). Target options are validated by each format's own model (formats/)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

# Strings that become ids, file or directory names: bounded, and only characters safe in paths and URLs.
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=96)]
NO_CONTROL = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$"  # no control characters or line separators
# Strings that name files, URIs, module globs: bounded, no control characters (a NUL breaks every os call).
Text = Annotated[str, StringConstraints(pattern=NO_CONTROL, min_length=1, max_length=1024)]
Pattern = Annotated[str, StringConstraints(pattern=NO_CONTROL, min_length=1, max_length=256)]
Patterns = Annotated[list[Pattern], Field(max_length=1024)]
# Sane upper bounds: far above any real use, low enough that nothing downstream overflows or allocates wildly.
MAX_TOKENS = 1 << 20  # sequence lengths
MAX_SEED = (1 << 32) - 1  # numpy's limit; torch accepts it too
MAX_GROUP = 1 << 16  # quantization group sizes


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSpec(Strict):
    source: Text = Field(description="local HF dir, hub id (org/name), a .gguf file, or dummy:CONFIG")
    revision: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][\w./-]*$", max_length=256)] | None = Field(
        None, description="hub commit/tag; required for hub ids")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    sanity_check: bool = Field(True, description="check the baseline is a working model before building "
                               "(quantkit/sanity.py); false only for a model known to need it")
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
    dataset: Text = Field("c4", description="a name defined in calibration/*.yaml, or a .txt/.jsonl/.parquet path")
    split: Name = "train"
    path: Text | None = Field(None, description="local file overriding where the dataset is read from")
    text_field: Pattern = "text"
    num_samples: int = Field(128, ge=1, le=1 << 16)
    seq_len: int = Field(2048, ge=16, le=MAX_TOKENS)
    seed: int = Field(0, ge=0, le=MAX_SEED)


class PerplexitySpec(Strict):
    datasets: list[Name] = Field(default_factory=lambda: ["wikitext2", "c4"], max_length=16)
    seq_len: int = Field(2048, ge=16, le=MAX_TOKENS)
    max_windows: int | None = Field(None, ge=1, le=1 << 20)
    batch_size: int = Field(1, ge=1, le=4096)

    @field_validator("datasets")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a dataset is listed twice")
        return v


class ThroughputSpec(Strict):
    prompt_len: int = Field(128, ge=1, le=MAX_TOKENS)
    gen_len: int = Field(32, ge=1, le=MAX_TOKENS)
    batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default_factory=lambda: [1], min_length=1,
                                                                    max_length=16)
    repetitions: int = Field(3, ge=1, le=1000, description="timed runs per batch size; ttft p99 is reported from 100")
    warmup: int = Field(1, ge=0, le=100)
    threads: int | None = Field(None, ge=1, le=4096, description="CPU threads (default: all cores)")


class EvalSpec(Strict):
    perplexity: PerplexitySpec | None = Field(default_factory=PerplexitySpec)
    throughput: ThroughputSpec | None = None


class GateSpec(Strict):
    """Limits an artifact must meet; a failing artifact is still published (as evidence), marked failed."""

    max_ppl_increase_pct: float | None = Field(None, ge=-100, le=1e6)
    min_decode_speedup: float | None = Field(None, gt=0, le=1e4)
    max_size_gb: float | None = Field(None, gt=0, le=1e6)


class StoreSpec(Strict):
    uri: Text = "./model-store"
    options: dict[str, Any] = Field(default_factory=dict, description="fsspec storage options for a remote uri, "
                                    "e.g. {endpoint_url: ..., client_kwargs: {region_name: ...}}; credentials "
                                    "belong in the environment (AWS_ACCESS_KEY_ID, ...), not in recipes")


class TargetSpec(BaseModel):
    """Common fields of every target; each format adds its own options (extra keys checked per format)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: Name
    format: Name


class Recipe(Strict):
    name: Name
    model: ModelSpec
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    targets: list[TargetSpec] = Field(default_factory=list, max_length=256)
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
