"""Quality gates: limits from the recipe (build-wide, overridable per target) checked on a report row.
A failing artifact is still published (it is evidence) with `gate.status: failed`; the build exits 3."""
from __future__ import annotations

from quantkit.recipe.schema import GateSpec


def limits_for(recipe_gates: GateSpec | None, target_gates: GateSpec | None) -> GateSpec | None:
    if recipe_gates is None and target_gates is None:
        return None
    merged = (recipe_gates.model_dump() if recipe_gates else {})
    merged.update({k: v for k, v in (target_gates.model_dump() if target_gates else {}).items() if v is not None})
    return GateSpec(**merged)


def check(row: dict, limits: GateSpec | None) -> dict | None:
    """Gate verdict for one report row (see report.rows); None when no gate applies."""
    if limits is None or row["format"] == "baseline":
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
