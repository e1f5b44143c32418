"""The quality-versus-speed picture: decode speedup (x) against perplexity change (y), one marker per
artifact sized by its bytes, the Pareto frontier drawn, each engine its own colour and legend entry."""
from __future__ import annotations

from pathlib import Path


def _primary_dataset(rs: list[dict]) -> str | None:
    ds = sorted({d for r in rs for d in r["ppl"]})
    return "wikitext2" if "wikitext2" in ds else (ds[0] if ds else None)


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (faster and lower perplexity change), sorted by speed."""
    best = []
    for x, y in sorted(points, key=lambda p: (-p[0], p[1])):
        if not best or y < best[-1][1]:
            best.append((x, y))
    return sorted(best)


def pareto_png(rs: list[dict], path: Path, title: str) -> Path | None:
    ds = _primary_dataset(rs)
    pts = [r for r in rs if r.get("decode_speedup") is not None and ds and r["ppl"].get(ds)
           and r["ppl"][ds]["change_pct"] is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    engines = sorted({r["speed_engine"] for r in pts})
    biggest = max(r["size_mb"] for r in pts)
    placed: list[tuple[float, float]] = []
    for i, eng in enumerate(engines):
        sel = [r for r in pts if r["speed_engine"] == eng]
        ax.scatter([r["decode_speedup"] for r in sel], [r["ppl"][ds]["change_pct"] for r in sel],
                   s=[60 + 900 * r["size_mb"] / biggest for r in sel], alpha=0.6, color=f"C{i}",
                   label=f"engine: {eng}" + (" (reference, not serving)"
                                             if any(r.get("serving_engine") is False for r in sel) else ""))
        f = frontier([(r["decode_speedup"], r["ppl"][ds]["change_pct"]) for r in sel])
        ax.plot([p[0] for p in f], [p[1] for p in f], "--", color=f"C{i}", linewidth=1)
    ax.autoscale_view()
    for r in pts:
        xy = (r["decode_speedup"], r["ppl"][ds]["change_pct"])
        # labels of points closer than a label's size (about 70 x 25 px) would print on top of each other
        near = sum(abs(a - b) < 70 and abs(c - d) < 25 for (a, c), (b, d) in
                   ((ax.transData.transform(xy), ax.transData.transform(p)) for p in placed))
        placed.append(xy)
        ax.annotate(f"{r['target']}\n{r['size_mb']:.0f} MB", xy, textcoords="offset points",
                    xytext=(8, 4 - 22 * near), fontsize=8)
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.axvline(1, color="grey", linewidth=0.5)
    ax.set_xlabel("decode speedup vs dense model in the same engine (batch 1)")
    ax.set_ylabel(f"perplexity change on {ds} (%)")
    ax.set_title(f"{title}: quality vs speed (marker area ~ artifact size; dashed: Pareto frontier)", fontsize=10)
    ax.legend(fontsize=8, loc="best", markerscale=0.4)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
