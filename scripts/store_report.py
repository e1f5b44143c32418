"""The report (report.md / .json / .html and the Pareto PNG) of one recipe's artifacts, from the store alone:
what `quantkit build` writes at its end, for a build whose targets ran in several processes (one may have failed).

    python scripts/store_report.py STORE_URI RECIPE_NAME OUT_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path


def main() -> int:
    store, name, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    from rich.console import Console

    from quantkit import report
    from quantkit.store.store import Store

    manifests = [m for m in Store(store).list() if m["recipe"]["name"] == name]
    rows = report.rows(manifests)
    for p in report.write_reports(rows, out, name):
        print(p)
    report.print_table(rows, Console(width=250), f"{name}: {len(manifests)} artifacts in the store")
    return 0


if __name__ == "__main__":
    sys.exit(main())
