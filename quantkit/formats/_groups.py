"""Layers whose in_features do not divide by the group size: one policy for gptq and awq, applied before
llm-compressor runs (which refuses such layers only after loading, and in a multi-line message).

- `error` (default): one line naming the layers and the fix.
- `ignore`: those layers stay unquantized (added to the ignore list).
- `fallback`: each gets the largest group size <= the requested one that divides its in_features, as extra
  llm-compressor config groups (exact names win over regexes over "Linear" in compressed-tensors' matching).
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Literal

from quantkit.errors import UserError

Indivisible = Literal["error", "ignore", "fallback"]
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass
class GroupPlan:
    group_size: int | None  # requested; None = per-channel (no groups, nothing can be indivisible)
    extra_ignore: list[str] = field(default_factory=list)  # targets (names or `re:`) left unquantized
    fallback: dict[int, list[str]] = field(default_factory=dict)  # group size -> targets (names or `re:`)
    summary: str = ""  # the layers concerned, human-readable

    def config_groups(self, make_scheme: Callable[[list[str], int | None], object]) -> dict[str, object]:
        """llm-compressor config_groups: group_0 = every Linear at the requested size, then one group per
        fallback size with its own targets."""
        groups = {"group_0": make_scheme(["Linear"], self.group_size)}
        for i, (gs, targets) in enumerate(sorted(self.fallback.items(), reverse=True), start=1):
            groups[f"group_{i}"] = make_scheme(targets, gs)
        return groups

    def info(self) -> dict:
        out: dict = {"group_size": self.group_size}
        if self.fallback:
            out["fallback"] = {str(gs): t for gs, t in sorted(self.fallback.items(), reverse=True)}
        if self.extra_ignore:
            out["indivisible_ignored"] = self.extra_ignore
        if self.summary:
            out["indivisible_layers"] = self.summary
        return out


def linear_in_features(model, ignore: list[str]) -> dict[str, int]:
    """in_features of every Linear llm-compressor would target (same matcher, same ignore semantics)."""
    import torch
    from compressed_tensors.utils import match_named_modules

    return {name: m.in_features for name, m in match_named_modules(model, ["Linear"], ignore)
            if isinstance(m, torch.nn.Linear)}


def largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def summarise(layers: dict[str, int], group_size: int) -> str:
    """{'model.layers.0.self_attn.q_proj': 576, ...} -> 'q_proj,k_proj,... in 30 layers: 576 % 128 != 0'."""
    parts = []
    by_in: dict[int, list[str]] = defaultdict(list)
    for name, n in layers.items():
        by_in[n].append(name)
    for n, names in sorted(by_in.items()):
        leaves = list(dict.fromkeys(x.rsplit(".", 1)[-1] for x in names))
        blocks = {m.group(1) for x in names if (m := _LAYER_INDEX.search(x))}
        shown = ",".join(leaves[:8]) + (",..." if len(leaves) > 8 else "")
        where = f" in {len(blocks)} layers" if blocks else ""
        parts.append(f"{shown}{where}: {n} % {group_size} != 0")
    return "; ".join(parts)


def compact_targets(names: list[str], all_names: list[str]) -> list[str]:
    """Exact names, shortened to `re:.*\\.<leaf>$` where that regex selects exactly the same modules."""
    chosen, out = set(names), []
    for leaf in dict.fromkeys(n.rsplit(".", 1)[-1] for n in names):
        same_leaf = {n for n in all_names if n.rsplit(".", 1)[-1] == leaf}
        mine = sorted(n for n in names if n.rsplit(".", 1)[-1] == leaf)
        out += [f"re:.*\\.{re.escape(leaf)}$"] if same_leaf <= chosen and "." in mine[0] else mine
    return out


def plan_groups(model, group_size: int | None, ignore: list[str], policy: Indivisible, target: str) -> GroupPlan:
    """Check every targeted Linear against group_size and apply the policy (raises UserError for `error`)."""
    if group_size is None:
        return GroupPlan(None)
    shapes = linear_in_features(model, ignore)
    bad = {n: k for n, k in shapes.items() if k % group_size}
    if not bad:
        return GroupPlan(group_size)
    summary = summarise(bad, group_size)
    if policy == "error":
        common = math.gcd(*shapes.values())
        pow2 = max((1 << i for i in range(group_size.bit_length()) if common % (1 << i) == 0), default=1)
        raise UserError(f"group_size {group_size} does not divide {summary}", where=f"target {target}",
                        fix=f"set `indivisible: fallback` (per layer, the largest group size that divides), "
                            f"`indivisible: ignore` (leave them unquantized), or `group_size: {pow2}`")
    names = list(shapes)
    if policy == "ignore":
        return GroupPlan(group_size, extra_ignore=compact_targets(list(bad), names), summary=summary)
    by_size: dict[int, list[str]] = defaultdict(list)
    for n, k in bad.items():
        by_size[largest_divisor_at_most(k, group_size)].append(n)
    return GroupPlan(group_size, fallback={gs: compact_targets(ns, names) for gs, ns in by_size.items()},
                     summary=summary)
