"""`--executor ray[:ADDRESS]`: every target a Ray task.

The driver builds the calibration set once and `ray.put`s it, so tasks receive it by reference (from the
object store, not re-sampled and not re-pickled per task). Each task loads the model itself (tasks may land
on different nodes), builds and evaluates its target and publishes to the shared store: the store must be
reachable from the workers (s3://..., or a path on a shared filesystem), and so must the model source;
workers need quantkit installed (the same version as the driver, or shipped with a runtime_env).
Per-target resource requests come from the target's `resources` option, e.g. `resources: {num_gpus: 1}`.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from quantkit.errors import GateFailed, UserError

# Ray's own task options; any other key of a target's `resources` is a custom cluster resource.
RAY_OPTIONS = {"num_cpus", "num_gpus", "memory", "accelerator_type"}
# Settings workers need to find data and the store. Credentials are not sent: runtime_env is stored in the
# cluster's control store and shown in its dashboard; workers use their node's own (env, instance role).
FORWARD_PREFIXES = ("QUANTKIT_", "HF_", "TOKENIZERS_", "TRANSFORMERS_")
FORWARD_NAMES = {"AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"}
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "KEY_ID")


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if (k.startswith(FORWARD_PREFIXES) or k in FORWARD_NAMES) and not any(w in k for w in SECRET_WORDS)}


def task_options(resources: dict | None) -> dict:
    """A target's `resources` as Ray task options (one CPU unless it says otherwise)."""
    opts: dict = {"num_cpus": 1}
    custom = {}
    for k, v in (resources or {}).items():
        (opts if k in RAY_OPTIONS else custom).__setitem__(k, v)
    if custom:
        opts["resources"] = custom
    return opts


def worker_plan(ctx, plan):
    """The plan as this worker would key it. Other library versions or other quantkit code than the driver
    planned with: refused in one line (the artifact would be published under versions that did not make it).
    Another dtype or device class (a CPU driver, a GPU worker): re-keyed, the artifact is what this worker
    makes."""
    import dataclasses

    from quantkit.build import key_inputs
    from quantkit.util import sha256_json

    mine = key_inputs(ctx, plan.fmt, plan.opts)
    theirs = plan.key_inputs
    differ = sorted(k for k in set(mine["versions"]) | set(theirs["versions"])
                    if mine["versions"].get(k) != theirs["versions"].get(k))
    if differ or mine["code"] != theirs["code"]:
        import socket

        what = ("library versions differ from the driver's plan: " + ", ".join(
            f"{k} {mine['versions'].get(k)} (driver {theirs['versions'].get(k)})" for k in differ)) if differ \
            else "its quantkit code differs from the driver's"
        raise UserError(f"Ray worker {socket.gethostname()}, target {plan.opts.name}: {what}; not built",
                        fix="install the driver's versions on every node (or ship them with a runtime_env)")
    if mine == theirs:
        return plan
    key = sha256_json(mine)
    return dataclasses.replace(plan, key=key, artifact_id=plan.artifact_id.rsplit(".", 1)[0] + f".{key[:12]}",
                               key_inputs=mine)


def build_target(loaded, source, calibration, plan, store_uri: str, store_options: dict, wants, done):
    """Runs on a worker: one target, built, evaluated and published exactly as in-process."""
    from rich.console import Console

    from quantkit.build import BuildResult, _build_one
    from quantkit.context import BuildContext
    from quantkit.store.store import Store

    workdir = Path(tempfile.mkdtemp(prefix="quantkit-ray-"))
    ctx = BuildContext(loaded, source, workdir)
    if calibration is not None:
        ctx.__dict__["calibration"] = calibration  # fills the cached_property: the driver's set, not a resample
        ctx.__dict__["calibration_fingerprint"] = calibration.fingerprint
    plan = worker_plan(ctx, plan)
    st = Store(store_uri, store_options)
    if st.has(plan.artifact_id):  # re-keyed to an artifact another run already made
        shutil.rmtree(workdir, ignore_errors=True)
        return plan, st.get(plan.artifact_id), []
    result = BuildResult(manifests=list(done))
    # Ray forwards a worker's stdout to the driver's stdout, which is reserved for the table/JSON: send the
    # libraries' chatter (llm-compressor, tqdm) to stderr, at the descriptor level as the CLI does
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        # the worker's own wants: a speed key names the device and host that measure it (this worker's)
        from quantkit.evaluation.run import wanted

        manifest = _build_one(ctx, st, plan, wanted(ctx) if wants else wants, Console(stderr=True), result)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        shutil.rmtree(workdir, ignore_errors=True)
    return plan, manifest, result.stages


class RayExecutor:
    name = "ray"
    in_process = False

    def __init__(self, address: str | None):
        self.address = address

    def _ray(self):
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs the ray package", fix='pip install "quantkit[ray]"') from None
        if not ray.is_initialized():
            kwargs = {} if self.address else {"include_dashboard": False}  # a local cluster: no dashboard
            try:
                ray.init(address=self.address, log_to_driver=True, **kwargs)
            except ConnectionError as e:
                raise UserError(f"--executor ray:{self.address}: cannot connect ({e})",
                                fix="check the address (ray status on the head node)") from None
        return ray

    def run(self, ctx, st, plans, wants, console, done: list[dict]) -> Iterator[tuple]:
        ray = self._ray()
        task = ray.remote(build_target)
        calibration = None
        if any(p.fmt.needs_calibration(p.opts) for p in plans):
            calibration = ray.put(ctx.calibration)  # sampled once, here; tasks get a reference
        shared = [ray.put(x) for x in (ctx.loaded, ctx.source, list(done), wants)]
        loaded, source, done_ref, wants_ref = shared
        env = {"env_vars": forwarded_env()}
        futures = {}
        for plan in plans:
            opts = task_options(getattr(plan.opts, "resources", None))
            calib = calibration if plan.fmt.needs_calibration(plan.opts) else None
            ref = task.options(name=f"quantkit:{plan.opts.name}", runtime_env=env, **opts).remote(
                loaded, source, calib, plan, st.uri, st.options, wants_ref, done_ref)
            futures[ref] = plan
            console.print(f"[bold]{plan.opts.name}[/]: submitted to Ray ({opts})", highlight=False)
        errors = []
        pending = list(futures)
        while pending:  # yield as they finish; let the others finish (and publish) even if one fails
            ready, pending = ray.wait(pending, num_returns=1)
            plan = futures[ready[0]]
            try:
                plan, manifest, stages = ray.get(ready[0])  # the worker's plan: re-keyed if it computes otherwise
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                errors.append(cause if isinstance(cause, (UserError, GateFailed)) else e)
                console.print(f"[bold red]{plan.opts.name}[/]: failed on Ray: {cause or e}", highlight=False)
                continue
            console.print(f"[bold]{plan.opts.name}[/]: published {manifest['id']} by a Ray worker")
            yield plan, manifest, stages
        if errors:
            raise errors[0]
