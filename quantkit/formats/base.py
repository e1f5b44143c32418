"""The format interface: an options model plus a handler with two jobs, `produce` and (via its engine) load.

A format turns the build's model (and, if it needs one, the shared calibration set) into files in a staging
directory. It never publishes, evaluates or names another format: the orchestrator does that for all of them.
Formats whose output is not an HF directory (GGUF) or that run an external tool (llama.cpp, ModelOpt) fit the
same shape: `produce` writes whatever files it likes and says which engine loads them and from which entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from quantkit.plugins import DuplicateName
from quantkit.recipe.schema import GateSpec, Name

if TYPE_CHECKING:
    from quantkit.context import BuildContext


class TargetOptions(BaseModel):
    """Base of every format's options. Subclasses add fields; unknown keys are errors (with did-you-mean)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: Name
    format: Name
    gates: GateSpec | None = None  # per-target limits; override the recipe's `gates`
    # what a distributed executor reserves for this target, e.g. {num_gpus: 1} (Ray task options)
    resources: dict[Name, Annotated[float, Field(ge=0, le=1e6)] | Name] | None = Field(None, max_length=32)

    # fields that say how to build or judge, not what is built: they do not key the artifact
    NOT_IDENTITY: ClassVar[set[str]] = {"name", "gates", "resources"}

    def identity(self) -> dict[str, Any]:
        """The options that define the artifact (the target's name, gates etc. do not)."""
        return self.model_dump(mode="json", exclude=self.NOT_IDENTITY)


@dataclass(frozen=True)
class Check:
    """An evaluation step the artifact needs beyond the recipe's measurements, run by the evaluation layer
    (quantkit.evaluation.checks) by name: a cross-check that must pass before publishing, or a tool's own
    protocol metric. `params` are the step's keyword arguments (JSON values)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Produced:
    """What `produce` wrote: `entry` is what the engine opens ("." = the directory itself, or a file name).

    Keys of `info` the orchestrator and report read (declared facts, so they name no format):
    - `dense_reference`: the unquantized model in its engine; speed-ups in that engine divide by it.
    - `quality_reference`: the row every other artifact's perplexity change is computed against.
    - `weight_bytes`: bytes the engine loads, where the artifact stores no files (the source itself).
    - `not_loaded`: path prefixes of extra copies in the artifact that the engine does not load.
    """

    entry: str = "."
    engine: str = "transformers"
    info: dict[str, Any] = field(default_factory=dict)  # format facts for the manifest (scheme, layers, ...)
    checks: list[Check] = field(default_factory=list)


class Format:
    """Subclass, set `name` and `Options`, implement `produce`; register with `@register`."""

    name: ClassVar[str]
    Options: ClassVar[type[TargetOptions]] = TargetOptions
    # distributions whose versions change the bytes this format writes; they key the artifact
    libraries: ClassVar[tuple[str, ...]] = ("torch", "transformers")
    internal: ClassVar[bool] = False  # True: used by the build itself, not selectable in recipes
    # Rough produce cost on 2 CPU cores, for the build's time-left estimate only (quantkit/progress.py corrects
    # it by measured times): seconds per 100M parameters: fixed, per 10k calibration tokens, and per 10k tokens
    # of one perplexity pass over the recipe's windows (formats that run verification passes inside produce).
    cost: ClassVar[tuple[float, float, float]] = (0.0, 0.0, 0.0)
    # the recipe's `baseline: true` adds one target of the format that sets this (built first: gates need it)
    reference: ClassVar[bool] = False
    needs_model: ClassVar[bool] = True  # False: produce never loads the model (ctx.load_model)

    def needs_calibration(self, opts: TargetOptions) -> bool:
        return False

    def variants(self, opts: TargetOptions) -> list[TargetOptions]:
        """One target may expand into several artifacts (e.g. GGUF `types: [Q8_0, Q4_K_M]`)."""
        return [opts]

    def describe(self, opts: TargetOptions) -> str:
        """Short scheme label for tables."""
        return opts.format

    def nominal_bits(self, opts: TargetOptions) -> float | None:
        """Bits per weight of the quantized (linear) weights, scales included; for the memory planner when no
        artifact exists yet. None: unknown (the planner then needs a built artifact)."""
        return None

    def estimate_s(self, opts: TargetOptions, *, params: int, calib_tokens: int, pass_tokens: int) -> float:
        """Rough produce seconds (time-left estimate): `cost` scaled by model size and calibration tokens;
        `pass_tokens` is the token count of one perplexity pass of the recipe."""
        fixed, per_calib, per_pass = self.cost
        calib = calib_tokens / 1e4 if self.needs_calibration(opts) else 0.0
        return params / 1e8 * (fixed + per_calib * calib + per_pass * pass_tokens / 1e4)

    def build_profile(self, opts: TargetOptions) -> tuple[str, str] | None:
        """(how the model is walked, algorithm) for the build planner (quantkit/build_plan.py): how is one of
        "model-free" (shards streamed, no model), "layerwise" (llm-compressor's sequential onloading), "whole"
        (forward passes over the whole model), "convert" (a tool reads the files); algorithm names a row of
        quantkit/data/build_costs.yaml. None: the planner cannot predict this format."""
        return None

    def produce(self, ctx: "BuildContext", opts: TargetOptions, out_dir: Path) -> Produced:
        raise NotImplementedError


_REGISTRY: dict[str, Format] = {}


def reference_format() -> Format:
    """The format the recipe's `baseline: true` adds."""
    return next(f for f in _REGISTRY.values() if f.reference)


class DuplicateFormat(DuplicateName):
    """A second format claims a name already registered (e.g. a plugin named like a built-in)."""


def register(cls: type[Format]) -> type[Format]:
    if cls.name in _REGISTRY:
        have = type(_REGISTRY[cls.name])
        raise DuplicateFormat(f"format name {cls.name!r} is already registered by {have.__module__}.{have.__name__}; "
                              f"{cls.__module__}.{cls.__name__} must use another name")
    _REGISTRY[cls.name] = cls()
    return cls
