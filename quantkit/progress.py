"""The build's running table: each artifact's row printed as soon as it is done, with the time left.

The time left is a sum of per-target estimates: each format states its own rough produce cost (`Format.cost`,
seconds on 2 CPU cores per 100M parameters), evaluation is priced per scored token, and both are corrected by
what the finished targets actually took on this host (their manifests' `build.wall_s`). On a CUDA host the
produce costs come from the build planner instead (quantkit/build_plan.py: per-layer costs measured on the H200,
scaled to this GPU's row of gpus.yaml): a 2-CPU-core figure there read "674 min" for a 72 s 8B build. It is a
console aid, not a measurement: nothing here is stored.
"""
from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console

from quantkit import report

# Eager-PyTorch perplexity on 2 CPU cores: about 1.2 s per 512-token window of a 135M-parameter fp32 model
# (the demo's baseline); throughput adds a few seconds. Seconds per (token x parameter), and per artifact.
EVAL_S_PER_TOKEN_PARAM = 1.2 / (512 * 1.35e8)
THROUGHPUT_S = 6.0
# On a GPU: perplexity is seconds; the compiled engine's warm-up and CUDA-graph capture dominate (H200 demo: ~15 s)
GPU_EVAL_S = 15.0


def gpu_produce_estimates(loaded, config: dict, host) -> tuple[dict[str, float], str] | None:
    """Produce seconds per target from the build planner for this host's GPU (placement.Host), and the label;
    None where the host has no CUDA device or its GPU is not in gpus.yaml (the CPU estimate stays)."""
    if not host.cuda_devices or not host.gpu_name:
        return None
    from quantkit import build_plan, planner
    from quantkit.errors import UserError

    try:
        gpu = planner.gpu_key_for_device(host.gpu_name)
        needs = build_plan.plan_recipe(loaded, config, gpu, host.cuda_devices, host.host_available)
    except (UserError, KeyError, ValueError):
        return None
    return ({n.target: n.minutes * 60 for n in needs if n.how != "?"},
            f"on {host.cuda_devices} x {gpu} (build planner)")


@dataclass
class _Item:
    name: str
    estimate_s: float
    cached: bool
    done: bool = False


def _duration(s: float) -> str:
    s = max(0, round(s))
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


class BuildProgress:
    """Called by the orchestrator: `planned` once with every plan, `finished` as each manifest is ready."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.items: dict[str, _Item] = {}
        self.manifests: list[dict] = []

    def planned(self, ctx, plans, cached_ids: set[str]) -> None:
        params = _param_count(ctx)
        c, ev = ctx.recipe.calibration, ctx.recipe.eval
        calib_tokens = c.num_samples * c.seq_len
        pass_tokens = (ev.perplexity.max_windows or 64) * ev.perplexity.seq_len if ev.perplexity else 0
        eval_s = EVAL_S_PER_TOKEN_PARAM * params * pass_tokens * (len(ev.perplexity.datasets) if ev.perplexity
                                                                   else 0)
        eval_s += THROUGHPUT_S if ev.throughput else 0
        gpu, where = self._gpu_estimates(ctx), "on 2 CPU cores"
        if gpu:
            (gpu, where), eval_s = gpu, GPU_EVAL_S
        for p in plans:
            produce = p.fmt.estimate_s(p.opts, params=params, calib_tokens=calib_tokens, pass_tokens=pass_tokens)
            produce = (gpu or {}).get(p.opts.name, produce)
            self.items[p.opts.name] = _Item(p.opts.name, produce + eval_s, p.artifact_id in cached_ids)
        todo = [i for i in self.items.values() if not i.cached]
        if todo:
            est = _duration(sum(i.estimate_s for i in todo))
            self.console.print(f"{len(todo)} to build, {len(self.items) - len(todo)} in store; estimated {est} "
                               f"{where}", highlight=False, soft_wrap=True)

    @staticmethod
    def _gpu_estimates(ctx):
        from quantkit.placement import probe
        from quantkit.planner import recipe_config

        host = probe()
        if not host.cuda_devices:
            return None
        return gpu_produce_estimates(ctx.loaded, recipe_config(ctx.recipe.model, ctx.loaded.path.parent), host)

    def finished(self, manifest: dict) -> None:
        item = self.items.get(manifest["target"]["name"])  # by name: a Ray worker may re-key its plan
        if item is None:
            return
        item.done = True
        self.manifests.append(manifest)
        row = next(r for r in report.rows(self.manifests) if r["id"] == manifest["id"])
        done = sum(i.done for i in self.items.values())
        left = self.time_left()
        tail = "" if item.cached else f" [dim]({manifest.get('build', {}).get('wall_s', 0):.0f} s)[/]"
        eta = f"  [dim]~{_duration(left)} left[/]" if left else ""
        self.console.print(f"[bold][{done}/{len(self.items)}][/] {report.row_line(row)}{tail}{eta}",
                           highlight=False, soft_wrap=True)  # one row, one line, whatever the width

    def time_left(self) -> float:
        """Estimates of the targets still to build, scaled by actual / estimated over the finished ones."""
        built = [i for i in self.items.values() if i.done and not i.cached]
        actual = sum(m.get("build", {}).get("wall_s", 0) for m in self.manifests
                     if not self.items[m["target"]["name"]].cached)
        estimated = sum(i.estimate_s for i in built)
        scale = actual / estimated if built and estimated > 0 and actual > 0 else 1.0
        return scale * sum(i.estimate_s for i in self.items.values() if not (i.done or i.cached))


def _param_count(ctx) -> int:
    """Parameters of the source, from its safetensors headers (nothing is loaded)."""
    from quantkit.formats.baseline import weight_stats

    try:
        return weight_stats(ctx.source.path)["param_count"] or 135_000_000
    except Exception:  # noqa: BLE001 - an estimate must never fail a build
        return 135_000_000
