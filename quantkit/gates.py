"""Quality gates: limits from the recipe (build-wide, overridable per target) checked on a report row.

Verdicts are computed from the recipe as it is now, at build and report time, and never written into the
write-once manifest: relaxing a gate changes the verdict of artifacts already published. A target's limits
are found by the exact recipe target an artifact came from (`target.recipe_target` in its manifest: `gguf`
for the variant `gguf-q4_k_m`), never by name prefix. A failing artifact is still published (it is evidence);
the build exits 3."""
from __future__ import annotations

from collections.abc import Iterable

from quantkit.recipe.loader import load_recipe
from quantkit.recipe.schema import GateSpec
from quantkit.report import rows


def limits_for(recipe_gates: GateSpec | None, target_gates: GateSpec | None) -> GateSpec | None:
    if recipe_gates is None and target_gates is None:
        return None
    merged = (recipe_gates.model_dump() if recipe_gates else {})
    merged.update({k: v for k, v in (target_gates.model_dump() if target_gates else {}).items() if v is not None})
    return GateSpec(**merged)


def check(row: dict, limits: GateSpec | None) -> dict | None:
    """Gate verdict for one report row (see report.rows); None when no gate applies."""
    if limits is None or row.get("quality_reference"):
        return None
    checks = []
    if limits.max_ppl_increase_pct is not None:
        changes = [p["change_pct"] for p in row["ppl"].values() if p["change_pct"] is not None]
        worst = max(changes) if changes else None
        checks.append({"gate": "max_ppl_increase_pct", "limit": limits.max_ppl_increase_pct, "value": worst,
                       "ok": worst is not None and worst <= limits.max_ppl_increase_pct})
    if limits.min_decode_speedup is not None:
        v = row.get("decode_speedup")
        checks.append({"gate": "min_decode_speedup", "limit": limits.min_decode_speedup, "value": v,
                       "ok": v is not None and v >= limits.min_decode_speedup})
    if limits.max_size_gb is not None:
        v = row["size_mb"] / 1000
        checks.append({"gate": "max_size_gb", "limit": limits.max_size_gb, "value": round(v, 3),
                       "ok": v <= limits.max_size_gb})
    return {"status": "passed" if all(c["ok"] for c in checks) else "failed", "checks": checks}


def describe_failure(row: dict, verdict: dict) -> str:
    bad = [f"{c['gate']}={c['value']} (limit {c['limit']})" for c in verdict["checks"] if not c["ok"]]
    return f"{row['target']} ({row['id']}): " + ", ".join(bad)


def recipe_target(manifest: dict) -> str:
    """The recipe target an artifact came from; manifests from before this field name their own target."""
    return manifest["target"].get("recipe_target") or manifest["target"]["name"]


def verdicts(recipe_gates: GateSpec | None, targets: Iterable, manifests: list[dict]) -> dict[str, dict]:
    """{artifact id: verdict (with its limits)} for the artifacts the gates apply to, under the given limits."""
    by_name = {t.name: t for t in targets}
    out = {}
    for row, m in zip(rows(manifests), manifests):
        target = by_name.get(recipe_target(m))
        limits = limits_for(recipe_gates, getattr(target, "gates", None))
        verdict = check(row, limits)
        if verdict:
            out[m["id"]] = {**verdict, "limits": limits.model_dump()}
    return out


def failures(found: dict[str, dict], manifests: list[dict]) -> list[str]:
    """One line per failing artifact, in the manifests' order."""
    return [describe_failure(r, found[r["id"]]) for r in rows(manifests)
            if found.get(r["id"], {}).get("status") == "failed"]


def apply(rows: list[dict], found: dict[str, dict]) -> list[dict]:
    """Report rows with each artifact's current verdict in `gate` (None where no gate applies)."""
    for r in rows:
        r["gate"] = (found.get(r["id"]) or {}).get("status")
    return rows


def from_recipe_file(path, manifests: list[dict]) -> dict[str, dict]:
    """Verdicts for the artifacts of the recipe at `path`, under its current gates (store list, report)."""
    loaded = load_recipe(path)
    mine = [m for m in manifests if m["recipe"]["name"] == loaded.recipe.name]
    return verdicts(loaded.recipe.gates, loaded.targets, mine)
