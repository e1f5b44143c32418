"""Comparison table over store manifests: size, compression, perplexity per dataset and change vs baseline."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table


def _size(m: dict) -> int:
    return m["info"].get("weight_bytes", 0) if m["target"]["format"] == "baseline" else m["total_size"]


def rows(manifests: list[dict]) -> list[dict]:
    """One row per artifact; each is compared with the baseline of the same source model, if present."""
    baselines = {m["source"]["fingerprint"]: m for m in manifests if m["target"]["format"] == "baseline"}
    out = []
    for m in manifests:
        base = baselines.get(m["source"]["fingerprint"])
        ref16 = base["info"].get("bytes_16bit") if base else None
        row = {"id": m["id"], "recipe": m["recipe"]["name"], "target": m["target"]["name"],
               "format": m["target"]["format"], "scheme": m["target"]["scheme"], "engine": m["engine"],
               "size_mb": round(_size(m) / 1e6, 1),
               "x_vs_16bit": round(ref16 / _size(m), 2) if ref16 and _size(m) else None, "ppl": {}}
        for ds, met in sorted(m.get("metrics", {}).get("perplexity", {}).items()):
            b = base and base.get("metrics", {}).get("perplexity", {}).get(ds)
            same = b and b.get("key") == met.get("key")  # compare only numbers from one protocol
            row["ppl"][ds] = {"ppl": round(met["ppl"], 3),
                              "change_pct": round(100 * (met["ppl"] / b["ppl"] - 1), 2) if same else None,
                              "protocol": met["protocol"], "seq_len": met["seq_len"], "windows": met["windows"]}
        out.append(row)
    return out


def _datasets(rs: list[dict]) -> list[str]:
    return sorted({d for r in rs for d in r["ppl"]})


def _flat(rs: list[dict]) -> tuple[list[str], list[list[str]]]:
    ds = _datasets(rs)
    header = ["target", "format", "scheme", "size MB", "x vs 16-bit"]
    for d in ds:
        header += [f"ppl {d}", "Δ %"]
    body = []
    for r in rs:
        line = [r["target"], r["format"], r["scheme"], f"{r['size_mb']:.1f}",
                f"{r['x_vs_16bit']:.2f}" if r["x_vs_16bit"] else "-"]
        for d in ds:
            p = r["ppl"].get(d)
            line += [f"{p['ppl']:.3f}" if p else "-",
                     f"{p['change_pct']:+.2f}" if p and p["change_pct"] is not None else "-"]
        body.append(line)
    return header, body


def protocol_note(rs: list[dict]) -> str:
    seen = {}
    for r in rs:
        for d, p in r["ppl"].items():
            seen[d] = f"{d}: {p['protocol']}, seq_len {p['seq_len']}, {p['windows']} windows"
    return "; ".join(seen[d] for d in sorted(seen))


def to_markdown(rs: list[dict], title: str = "") -> str:
    header, body = _flat(rs)
    lines = [f"## {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(b) + " |" for b in body]
    lines += ["", f"Perplexity protocol: {protocol_note(rs)}. Engine: transformers (reference, not serving)."]
    return "\n".join(lines) + "\n"


def to_csv(rs: list[dict]) -> str:
    header, body = _flat(rs)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(body)
    return buf.getvalue()


def to_json(rs: list[dict]) -> str:
    return json.dumps(rs, indent=2)


def print_table(rs: list[dict], console: Console | None = None, title: str = "") -> None:
    console = console or Console()
    header, body = _flat(rs)
    t = Table(title=title or None)
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i < 3 else "right")
    for b in body:
        t.add_row(*b)
    console.print(t)
    console.print(f"[dim]perplexity: {protocol_note(rs)}[/]")


def write_reports(rs: list[dict], out_dir: Path, title: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("report.md", to_markdown(rs, title)), ("report.json", to_json(rs))):
        p = out_dir / name
        p.write_text(text)
        written.append(p)
    return written
