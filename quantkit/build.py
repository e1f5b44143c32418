"""The build orchestrator: recipe -> source -> (calibration) -> each format -> evaluation -> store -> rows.

It knows formats only through the registry. An artifact is keyed by everything that decides its bytes, all of
it content and settings (format options, source and calibration fingerprints, the resolved dtype and device
class, library versions, the code identity of the format's modules), never where files sit or which host ran;
an artifact already in the store is not rebuilt, and a measurement already stored under the same protocol key
is not repeated. Gate verdicts are not stored: they are computed from the current recipe (quantkit.gates).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import functools
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from quantkit import gates
from quantkit.code_identity import code_identity
from quantkit.context import BuildContext
from quantkit.errors import UserError
from quantkit.executors import get_executor
from quantkit.evaluation.checks import Subject, run_checks
from quantkit.evaluation.in_memory import score_in_memory
from quantkit.evaluation.run import Want, evaluate, have_keys, measurable, wanted
from quantkit.formats import Format, TargetOptions, get_format, reference_format
from quantkit.formats._storage_dtype import storage_dtype
from quantkit.recipe.loader import LoadedRecipe
from quantkit.sources.resolve import resolve_source
from quantkit.store.manifest import merge
from quantkit.store.store import Store
from quantkit.util import (StagePeak, current_rss_mb, host_info, library_versions, peak_rss_mb, release_memory,
                           sha256_json)


@dataclass
class Plan:
    fmt: Format
    opts: TargetOptions
    key: str
    artifact_id: str
    target: str = ""  # the recipe target it comes from (GGUF variants: `gguf` for `gguf-q4_k_m`); gates by it
    key_inputs: dict = field(default_factory=dict)  # what `key` hashes (recorded in the manifest's `build`)
    sanity: dict | None = None  # the baseline sanity check (or why it was skipped), recorded in the manifest


def key_inputs(ctx: BuildContext, fmt: Format, opts: TargetOptions) -> dict:
    """Everything that decides an artifact's bytes; content and settings only (no path, host or user)."""
    return {"format": fmt.name, "options": opts.identity(), "source": ctx.source.fingerprint,
            "calibration": ctx.calibration_fingerprint if fmt.needs_calibration(opts) else None,
            "dtype": str(ctx.torch_dtype).removeprefix("torch."), "device": ctx.device_class,
            "storage_dtype": storage_dtype(ctx),
            "versions": library_versions(tuple(fmt.libraries)), "code": code_identity(type(fmt).__module__)}


@dataclass
class BuildResult:
    manifests: list[dict]
    built: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)  # per-stage wall time and peak RSS, for the bench script


def store_uri(loaded: LoadedRecipe, override: str | None) -> str:
    import os

    uri = override or os.environ.get("QUANTKIT_STORE") or loaded.recipe.store.uri
    if "://" not in uri and not Path(uri).is_absolute():
        uri = str(Path.cwd() / uri)
    return uri


def _plans(ctx: BuildContext, only: list[str] | None) -> list[Plan]:
    targets = list(ctx.loaded.targets)
    if ctx.recipe.baseline:
        ref = reference_format()
        targets.insert(0, ref.Options(name=ref.name, format=ref.name))
    names = [t.name for t in targets]
    only = only or None  # typer gives [] when --target is absent
    for name in only or ():
        if name not in names:
            raise UserError(f"--target {name!r} is not in recipe {ctx.recipe.name}; targets: {', '.join(names)}")
    from quantkit.architectures import read_config, target_problems

    problems = target_problems(read_config(ctx.source.path), [t for t in targets
                                                              if only is None or t.name in only])
    if problems:  # before any work: one line naming the target, the architecture and what is missing
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more, fix="drop the target, or use a format that supports it")
    plans = []
    for t in targets:
        fmt = get_format(t.format)
        for v in fmt.variants(t):
            if only is not None and t.name not in only and not fmt.reference:
                continue
            inputs = key_inputs(ctx, fmt, v)
            key = sha256_json(inputs)
            plans.append(Plan(fmt, v, key, f"{ctx.recipe.name}.{v.name}.{key[:12]}", t.name, inputs))
    return plans


@contextlib.contextmanager
def _stage(result: BuildResult, name: str):
    """Time one stage and sample its peak RSS; the records feed scripts/bench_build.py and --json. CPU seconds
    (this process's threads plus finished child tools) say what the stage costs on a shared, loaded host."""
    t0, c0, r0 = time.perf_counter(), _cpu_s(), current_rss_mb()
    with StagePeak() as peak:
        yield
    result.stages.append({"stage": name, "wall_s": round(time.perf_counter() - t0, 2),
                          "cpu_s": round(_cpu_s() - c0, 2), "peak_rss_mb": round(peak.peak, 1),
                          "peak_anon_mb": round(peak.anon, 1), "peak_file_mb": round(peak.file, 1),
                          "rss_start_mb": round(r0, 1), "rss_end_mb": round(current_rss_mb(), 1)})


def _cpu_s() -> float:
    import os

    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_build(loaded: LoadedRecipe, *, only_target: list[str] | None = None, store: str | None = None,
              console: Console | None = None, executor: str | None = None, progress=None,
              no_sanity_check: bool = False) -> BuildResult:
    """`progress` (quantkit.progress.BuildProgress or alike) hears `planned` once and `finished` per artifact."""
    console = console or Console(stderr=True)
    t0 = time.perf_counter()
    result = BuildResult(manifests=[])
    runner = get_executor(executor)
    st = Store(store_uri(loaded, store), loaded.recipe.store.options)
    with _stage(result, "resolve source + plan"):
        source = resolve_source(loaded.recipe.model, base_dir=loaded.path.parent)
        workdir = Path(tempfile.mkdtemp(prefix="quantkit-build-"))
        ctx = BuildContext(loaded, source, workdir)
        plans = _plans(ctx, only_target)
        wants = wanted(ctx)
    try:
        todo = [p for p in plans if not st.has(p.artifact_id)]
        if any(p.fmt.needs_model for p in todo):  # decided before any work: bad offload/gpus fail first
            console.print(f"placement: {ctx.placement.describe()}", highlight=False)
            for note in ctx.placement.notes:
                console.print(f"  {note}", highlight=False)
            _start_ranks(ctx, todo, executor)
        if progress:
            progress.planned(ctx, plans, {p.artifact_id for p in plans} - {p.artifact_id for p in todo})
        if todo:
            with _stage(result, "baseline sanity check"):
                sanity = _sanity(ctx, no_sanity_check, console)
            for p in plans:
                p.sanity = sanity
        if any(p.fmt.needs_calibration(p.opts) for p in todo):
            with _stage(result, "calibration set (once)"):
                console.print(f"calibration: {ctx.calibration.meta['num_samples']} x "
                              f"{ctx.calibration.meta['seq_len']} tokens from {ctx.calibration.meta['origin']}",
                              highlight=False)
        queued = []
        for plan in plans:
            if st.has(plan.artifact_id):
                manifest = st.get(plan.artifact_id)
                have = have_keys(manifest.get("metrics", {}))
                missing = [w for w in measurable(manifest["engine"], wants) if w.key not in have]
                if missing:
                    console.print(f"[bold]{plan.opts.name}[/]: in store, measuring "
                                  f"{', '.join(w.name for w in missing)}")
                    path, entry = _artifact_path(ctx, st, manifest, workdir)
                    for m in evaluate(ctx, manifest["engine"], path, entry, missing, console):
                        st.add_eval(plan.artifact_id, m)
                    manifest = st.get(plan.artifact_id)
                result.cached.append(plan.artifact_id)
                result.manifests.append(manifest)
                progress and progress.finished(manifest)
                continue
            if not plan.fmt.reference:  # targets go to the executor; the reference first, here
                queued.append(plan)
                continue
            result.manifests.append(_build_one(ctx, st, plan, wants, console, result))
            result.built.append(plan.artifact_id)
            progress and progress.finished(result.manifests[-1])
        for plan, manifest, stages in runner.run(ctx, st, queued, wants, console, result.manifests):
            result.manifests.append(manifest)
            result.built.append(plan.artifact_id)
            result.stages += stages
            progress and progress.finished(manifest)
        # executors may finish in any order, and a Ray worker may re-key its plan (another dtype or device)
        order = {p.opts.name: i for i, p in enumerate(plans)}
        result.manifests.sort(key=lambda m: order[m["target"]["name"]])
        position = {m["id"]: order[m["target"]["name"]] for m in result.manifests}
        result.built.sort(key=position.__getitem__)
    finally:
        if getattr(ctx, "ranks", None) is not None:
            ctx.ranks.close()
        shutil.rmtree(workdir, ignore_errors=True)
    result.stages.append({"stage": "total", "wall_s": round(time.perf_counter() - t0, 2),
                          "peak_rss_mb": round(peak_rss_mb(), 1)})
    return result


def _start_ranks(ctx: BuildContext, todo: list[Plan], executor: str | None) -> None:
    """Several GPUs and a layer-by-layer calibration to do here: start its ranks now, so that their imports and
    process group overlap the baseline and the calibration set (quantkit/distributed.py, Ranks)."""
    from quantkit.distributed import Ranks

    walks = [p for p in todo if (p.fmt.build_profile(p.opts) or ("",))[0] == "layerwise"]
    if ctx.placement.gpus > 1 and walks and not ctx.architecture.moe and executor in (None, "inprocess"):
        ctx.ranks = Ranks(ctx.placement.gpus, ctx.workdir / "ranks-early")


def _sanity(ctx: BuildContext, flag: bool, console: Console) -> dict:
    """Stop before any target is built when the baseline is not a working model (quantkit/sanity.py)."""
    from quantkit.sanity import check_baseline, skip_reason

    why = skip_reason(ctx.source.path, ctx.recipe.model.sanity_check, flag)
    if why:
        console.print(f"baseline sanity check skipped: {why}", highlight=False)
        return {"status": "skipped", "reason": why}
    rec = check_baseline(ctx)
    console.print(f"baseline sanity check: ppl {rec['ppl']:.1f} (limit {rec['ppl_limit']:.0f}), "
                  f"{rec['probes_right']}/{len(rec['probes'])} continuations right", highlight=False)
    return rec


def _artifact_path(ctx: BuildContext, st: Store, manifest: dict, workdir: Path) -> tuple[Path, str]:
    """(directory, entry) to evaluate. The baseline has no files: it is this build's source, wherever it sits
    now (its key is the source's content fingerprint; the path in its manifest is where it sat then)."""
    if not manifest["files"]:
        return ctx.source.path, str(ctx.source.path)
    return st.materialize(manifest["id"], workdir / "pulled" / manifest["id"]), manifest["entry"]


def _build_one(ctx: BuildContext, st: Store, plan: Plan, wants: list[Want], console: Console,
               result: BuildResult) -> dict:
    fmt, opts = plan.fmt, plan.opts
    console.print(f"[bold]{opts.name}[/] ({fmt.describe(opts)}): building")
    staging = ctx.workdir / "stage" / plan.artifact_id
    staging.mkdir(parents=True)
    ctx.score_in_memory = functools.partial(score_in_memory, ctx)  # the evaluation layer, offered to formats
    t0 = time.perf_counter()
    ctx.devices = {}
    with _stage(result, f"{opts.name}: produce"):
        produced = fmt.produce(ctx, opts, staging)
    build_s = time.perf_counter() - t0
    console.print(f"  produced in {build_s:.1f} s")
    for stage, where in ctx.devices.items():
        console.print(f"  {stage}: {where}", highlight=False)
    with _stage(result, f"{opts.name}: evaluate"):
        metrics = merge({}, evaluate(ctx, produced.engine, staging, produced.entry, wants, console))
    checks = {}
    if produced.checks:  # the artifact's own evaluation steps; a failing cross-check publishes nothing
        with _stage(result, f"{opts.name}: checks"):
            checks = run_checks(Subject(ctx, produced.engine, staging, produced.entry, metrics),
                                produced.checks, console)
    needs_calib = fmt.needs_calibration(opts)
    manifest = {
        "id": plan.artifact_id,
        "key": plan.key,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": host_info(),
        "recipe": {"name": ctx.recipe.name, "hash": ctx.loaded.hash, "path": str(ctx.loaded.path)},
        "target": {"name": opts.name, "format": fmt.name, "scheme": fmt.describe(opts),
                   "options": opts.model_dump(mode="json"), "recipe_target": plan.target or opts.name},
        "engine": produced.engine,
        "entry": produced.entry,
        "source": ctx.source.as_dict(),
        "calibration": ctx.calibration.meta if needs_calib else None,
        "sanity": plan.sanity,
        "versions": library_versions(),
        "info": produced.info,
        "metrics": metrics,
        "checks": checks,
        "build": {"produce_s": round(build_s, 2), "wall_s": round(time.perf_counter() - t0, 2),
                  "peak_rss_mb": round(peak_rss_mb(), 1), "argv": sys.argv, "key_inputs": plan.key_inputs,
                  "devices": dict(ctx.devices)},
    }
    manifest["total_size"] = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
    if produced.entry == str(ctx.source.path):
        manifest["total_size"] = 0
    with _stage(result, f"{opts.name}: publish"):
        published = st.publish(staging if produced.entry != str(ctx.source.path) else None, manifest,
                               link=True)  # staging is removed just below: the store may take its files
    shutil.rmtree(staging, ignore_errors=True)
    console.print(f"  published {published['id']} ({published['total_size'] / 1e6:.1f} MB)")
    release_memory()  # before the next target loads its model
    return published
