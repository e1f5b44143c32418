"""Write README's architecture support table from the architecture matrix's test results.

    python -m pytest tests/test_arch_matrix.py tests/test_gguf_import_archs.py   # writes the JSON (conftest)
    python scripts/arch_support_table.py [--json .pytest_cache/arch-matrix.json ...] [--readme README.md]

Each cell is architecture x format (with the engine that scored it): `ok (N)` = N tests passed for the cell,
`no (N)` = declared unsupported and its refusal tested by N tests (the reason is listed under the table),
`FAIL` = a test failed, `-` = not in the matrix (the reason is listed). The JSON is copied to docs/benchmarks/arch-matrix.json with the table.
Several files merge; for a test in more than one, the last file's result counts (re-run rows, then regenerate
with `--json docs/benchmarks/arch-matrix.json NEW.json`).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
START, END = "<!-- arch-matrix:start -->", "<!-- arch-matrix:end -->"


def render(cells: list[dict]) -> str:
    from quantkit.architectures import TABLE
    from tiny_models import ARCHS, NO_GGUF

    model_types = {"llama3": "llama", "qwen2.5": "qwen2", "qwen3": "qwen3", "mistral": "mistral", "gemma2": "gemma2",
                   "gemma3": "gemma3_text", "phi3": "phi3", "qwen3-moe": "qwen3_moe", "mixtral": "mixtral"}
    by_type = {t: a for a in TABLE for t in a.model_types}
    formats = list(dict.fromkeys(c["format"] for c in cells))
    engines = {c["format"]: c["engine"] for c in cells}
    grid: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        grid[(c["arch"], c["format"])].append(c)
    head = "| architecture | " + " | ".join(f"{f} ({engines[f]})" for f in formats) + " |"
    lines = [head, "|" + " --- |" * (len(formats) + 1)]
    reasons: dict[str, set[str]] = defaultdict(set)
    for arch in ARCHS:
        row = []
        for f in formats:
            cs = grid.get((arch, f), [])
            if not cs:
                row.append("-")
            elif any(c["status"] == "failed" for c in cs):
                row.append(f"FAIL ({sum(c['status'] == 'failed' for c in cs)}/{len(cs)})")
            elif all(c["status"] == "unsupported" for c in cs):
                row.append(f"no ({len(cs)})")
                entry = by_type[model_types[arch]]
                why = next((w for k, w in entry.unsupported.items() if k.split(":")[0] == f), "")
                reasons[f"{entry.name} x {f}"].add(why)
            else:
                row.append(f"ok ({len(cs)})")
        lines.append(f"| {by_type[model_types[arch]].name} | " + " | ".join(row) + " |")
    total = sum(len(v) for v in grid.values())
    wall = sum(c.get("duration_s", 0) for c in cells)
    notes = [f"- {k}: {'; '.join(sorted(v))}" for k, v in sorted(reasons.items())]
    notes += [f"- `-` {by_type[model_types[a]].name} x gguf: not testable with the tiny checkpoint ({why})"
              for a, why in NO_GGUF.items()]
    return "\n".join([*lines, "", f"{total} cell tests, {wall:.0f} s of test time on the CPU "
                      f"(`ok (N)`: N tests passed; `no (N)`: refused by the plan in one line, N tests).", *notes])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, nargs="+", default=[ROOT / ".pytest_cache" / "arch-matrix.json"],
                    help="one or more JSON files written by test sessions (QUANTKIT_ARCH_MATRIX_JSON)")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = ap.parse_args()
    # a later file's result for the same test replaces an earlier one (re-running some rows of the matrix)
    cells = list({c["test"]: c for f in args.json for c in json.loads(f.read_text())}.values())
    table = render(cells)
    text = args.readme.read_text()
    if START not in text:
        raise SystemExit(f"{args.readme} has no {START} ... {END} section")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    args.readme.write_text(f"{before}{START}\n{table}\n{END}{after}")
    out = ROOT / "docs" / "benchmarks" / "arch-matrix.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(cells, indent=1) + "\n")
    print(table)


if __name__ == "__main__":
    main()
