"""Comparison table over store manifests: size, compression, perplexity per dataset and change vs baseline."""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path

from rich.console import Console
from rich.table import Table


ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def baseline_run_dtype(m: dict) -> str | None:
    """The dtype the dense baseline was evaluated in (its metric records say; a GPU run of an fp32 file is bf16)."""
    metrics = m.get("metrics", {})
    for rec in [metrics.get("throughput") or {}, *metrics.get("perplexity", {}).values()]:
        if rec.get("dtype") in ITEMSIZE:
            return rec["dtype"]
    return m["info"].get("dtype") if m["info"].get("dtype") in ITEMSIZE else None


def _size(m: dict) -> int:
    """Bytes of what the engine loads: for an artifact that stores no files (the dense source itself), its
    weights at the dtype it was run in (not the file's: an fp32 checkpoint evaluated in bf16 is a bf16 model),
    else `info.weight_bytes`; otherwise its files less the extra copies it declares `not_loaded` (e.g. a
    second, classic layout beside the compressed-tensors checkpoint)."""
    if not m["files"]:
        info, dtype = m["info"], baseline_run_dtype(m)
        if dtype and info.get("param_count"):
            return info["param_count"] * ITEMSIZE[dtype]
        return info.get("weight_bytes", 0)
    extra = tuple(m["info"].get("not_loaded") or ())
    return m["total_size"] - sum(f["size"] for f in m["files"] if extra and f["path"].startswith(extra))


def _throughput(m: dict) -> dict | None:
    return m.get("metrics", {}).get("throughput")


def _same_setup(a: dict, b: dict) -> bool:
    """Two speed records can be divided only if one engine on one device (by name) on one host made both,
    under one protocol (the key also covers library versions and kernel data)."""
    return all(a.get(k) == b.get(k) for k in ("engine", "device", "host", "key"))


def _speed_reference(m: dict, manifests: list[dict]) -> dict | None:
    """Speedups compare like with like: the dense model measured by the same engine on the same device, i.e.
    an artifact that declares `info.dense_reference` (the unquantized baseline, a dense GGUF, ...). No such
    record: no speedup ("-")."""
    tp = _throughput(m)
    if not tp:
        return None
    same_src = [o for o in manifests if o["source"]["fingerprint"] == m["source"]["fingerprint"] and _throughput(o)
                and _same_setup(_throughput(o), tp)]
    for o in same_src:
        if o["info"].get("dense_reference"):
            return o
    return None


def _decode(m: dict) -> float | None:
    tp = _throughput(m)
    b1 = tp and tp["batches"].get("1")
    return b1["decode_tok_s"] if b1 else None


def rows(manifests: Iterable[dict]) -> list[dict]:
    """One row per artifact; each is compared with the baseline of the same source model, if present."""
    manifests = list(manifests)  # read several times below; Store.list() is a generator
    baselines = {m["source"]["fingerprint"]: m for m in manifests if m["info"].get("quality_reference")}
    out = []
    for m in manifests:
        base = baselines.get(m["source"]["fingerprint"])
        ref16 = base["info"].get("bytes_16bit") if base else None
        row = {"id": m["id"], "recipe": m["recipe"]["name"], "target": m["target"]["name"],
               "format": m["target"]["format"], "scheme": m["target"]["scheme"], "engine": m["engine"],
               "size_mb": round(_size(m) / 1e6, 1),
               "size_basis": (f"weights at {baseline_run_dtype(m)}, the dtype it ran in" if
                              not m["files"] and baseline_run_dtype(m) else "files"),
               "x_vs_16bit": round(ref16 / _size(m), 2) if ref16 and _size(m) else None, "ppl": {},
               "gate": None,  # a recipe's current verdict, filled by gates.apply; never read from the manifest
               "quality_reference": bool(m["info"].get("quality_reference")),
               "weights": m["source"].get("weights", "real")}  # "dummy": random weights, sizes and speeds only
        tp, ref = _throughput(m), _speed_reference(m, manifests)
        if tp:
            first = next(iter(tp["batches"].values()))
            rf = tp.get("roofline", {})
            row.update({"speed_engine": tp["engine"], "speed_device": tp.get("device"),
                        "serving_engine": tp.get("serving_engine"), "prefill_tok_s": first["prefill_tok_s"],
                        "decode_tok_s": _decode(m), "ttft_p50_s": first.get("ttft_p50_s"),
                        "decode_pct_of_bound": rf.get("decode_pct_of_bound"),
                        "weight_bytes_per_token": rf.get("bytes_per_token")})
            if ref and _decode(ref) and _decode(m):
                rref = _throughput(ref).get("roofline", {})
                row["decode_speedup"] = round(_decode(m) / _decode(ref), 3)
                if rref.get("bytes_per_token") and rf.get("bytes_per_token"):
                    row["speedup_bound"] = round(rref["bytes_per_token"] / rf["bytes_per_token"], 3)
        quality = {} if row["weights"] == "dummy" else m.get("metrics", {}).get("perplexity", {})
        for ds, met in sorted(quality.items()):
            b = base and base.get("metrics", {}).get("perplexity", {}).get(ds)
            same = b and b.get("key") == met.get("key")  # compare only numbers from one protocol
            row["ppl"][ds] = {"ppl": round(met["ppl"], 3),
                              "change_pct": round(100 * (met["ppl"] / b["ppl"] - 1), 2) if same else None,
                              "change_se_pct": paired_se_pct(met, b) if same else None,
                              "protocol": met["protocol"], "seq_len": met["seq_len"], "windows": met["windows"]}
        out.append(row)
    return out


def paired_se_pct(met: dict, base: dict) -> float | None:
    """Standard error (percentage points) of a ppl change, from the per-window NLLs of artifact and baseline on
    the same windows: the text's own window-to-window spread cancels in the differences d_i, so
    SE = exp(mean d) * sd(d) / sqrt(n). None when either record lacks per-window values (older manifests)."""
    import math
    import statistics

    a, b = met.get("window_nll"), base.get("window_nll")
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    d = [x - y for x, y in zip(a, b)]
    return round(100 * math.exp(statistics.fmean(d)) * statistics.stdev(d) / math.sqrt(len(d)), 2)


def _datasets(rs: list[dict]) -> list[str]:
    return sorted({d for r in rs for d in r["ppl"]})


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _flat(rs: list[dict]) -> tuple[list[str], list[list[str]]]:
    ds = _datasets(rs)
    speed = any("speed_engine" in r for r in rs)
    gated = any(r.get("gate") for r in rs)
    header = ["target", "format", "scheme", "size MB", "x vs 16-bit"]
    for d in ds:
        header += [f"ppl {d}", "Δ %"]
    if speed:
        header += ["speed engine", "prefill tok/s", "decode tok/s", "decode speedup", "bound", "% of bound"]
    if gated:
        header += ["gate"]
    body = []
    for r in rs:
        line = [r["target"], r["format"], r["scheme"], f"{r['size_mb']:.1f}", _fmt(r["x_vs_16bit"], ".2f")]
        for d in ds:
            p = r["ppl"].get(d)
            se = p and p.get("change_se_pct")
            line += [_fmt(p and p["ppl"], ".3f"), _fmt(p and p["change_pct"], "+.2f") + (f" ±{se:.2f}" if se else "")]
        if speed:
            line += [r.get("speed_engine", "-"), _fmt(r.get("prefill_tok_s"), ".0f"),
                     _fmt(r.get("decode_tok_s"), ".1f"), _fmt(r.get("decode_speedup"), ".2f"),
                     _fmt(r.get("speedup_bound"), ".2f"), _fmt(r.get("decode_pct_of_bound"), ".2g")]
        if gated:
            line += [r.get("gate") or "-"]
        body.append(line)
    return header, body


def row_line(r: dict) -> str:
    """One row on one line: what the build prints as each artifact is done, before the whole table."""
    parts = [f"{r['target']:<18} {r['scheme']}", f"{r['size_mb']:.1f} MB"]
    for d, p in sorted(r["ppl"].items()):
        se = f" ±{p['change_se_pct']:.2f}" if p.get("change_se_pct") else ""
        parts.append(f"ppl {d} {p['ppl']:.3f}" + ("" if p["change_pct"] is None else f" ({p['change_pct']:+.2f}{se} %)"))
    if r.get("decode_tok_s"):
        speedup = f", x{r['decode_speedup']:.2f}" if r.get("decode_speedup") else ""
        parts.append(f"decode {r['decode_tok_s']:.1f} tok/s{speedup} ({r['speed_engine']})")
    if r.get("gate"):
        parts.append(f"gate {r['gate']}")
    return " | ".join(parts)


def protocol_note(rs: list[dict]) -> str:
    seen = {}
    for r in rs:
        for d, p in r["ppl"].items():
            seen[d] = f"{d}: {p['protocol']}, seq_len {p['seq_len']}, {p['windows']} windows"
    return "; ".join(seen[d] for d in sorted(seen))


def speed_note(rs: list[dict]) -> str:
    """One line: which engine on which device produced the speed columns."""
    made = sorted({(r["speed_engine"], r.get("speed_device") or "?") for r in rs if r.get("speed_engine")})
    if not made:
        return ""
    by = "; ".join(f"`{e}` on {d}" for e, d in made)
    return (f"Speed columns measured by {by}: each speedup divides by the dense model timed by the same engine on "
            "the same device (else \"-\"); vLLM, SGLang or TensorRT-LLM serving may be faster or slower.")


def to_markdown(rs: list[dict], title: str = "") -> str:
    header, body = _flat(rs)
    lines = [f"## {title}", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(b) + " |" for b in body]
    lines += ["", f"Perplexity protocol: {protocol_note(rs)}."]
    if speed_note(rs):
        lines += [speed_note(rs)]
    if any(p.get("change_se_pct") for r in rs for p in r["ppl"].values()):
        lines += ["`±`: standard error of the change, from the per-window differences to the baseline on the same "
                  "windows (more windows shrink it by the square root)."]
    lines += [f"Size of `{r['target']}`: {r['size_basis']} (not its file size)." for r in rs
              if r.get("size_basis", "files") != "files"]
    reference_only = sorted({r["speed_engine"] for r in rs if r.get("serving_engine") is False})
    if reference_only:
        lines += [f"Speed from {', '.join(f'`{e}`' for e in reference_only)} is a reference measurement, not "
                  "a serving engine's speedup. Decode speedup compares with the dense model in the same engine; "
                  "`bound` is the memory-bandwidth bound on it (weight bytes read per token); `% of bound` is "
                  "measured decode as a share of bandwidth / weight bytes."]
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
    if speed_note(rs):
        console.print(f"[dim]{speed_note(rs)}[/]", highlight=False)


def to_html(rs: list[dict], title: str = "quantkit report", image: str | None = None) -> str:
    import html

    header, body = _flat(rs)
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in b) + "</tr>" for b in body)
    img = f'<img src="{html.escape(image)}" alt="Pareto plot" style="max-width:900px">' if image else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}</style></head><body>"
            f"<h2>{html.escape(title)}</h2><table><tr>{th}</tr>{trs}</table>"
            f"<p>{html.escape(protocol_note(rs))}</p><p>{html.escape(speed_note(rs))}</p>{img}</body></html>\n")


RENDERERS = {"md": to_markdown, "csv": to_csv, "json": to_json, "html": to_html}


def write_reports(rs: list[dict], out_dir: Path, title: str) -> list[Path]:
    from quantkit.plot import pareto_png

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    png = pareto_png(rs, out_dir / "pareto.png", title)
    for name, text in (("report.md", to_markdown(rs, title)), ("report.json", to_json(rs)),
                       ("report.html", to_html(rs, title, png.name if png else None))):
        p = out_dir / name
        p.write_text(text)
        written.append(p)
    return written + ([png] if png else [])
