"""`quantkit store ...` commands: inspect and maintain a model store."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

store_app = typer.Typer(help="Inspect and maintain the model store.", no_args_is_help=True)
StoreOpt = typer.Option(None, "--store", help="store URI (default: recipe store.uri, $QUANTKIT_STORE, ./model-store)")
out = Console(width=None if os.isatty(1) else 160)


def open_store(uri: Optional[str]):
    from quantkit.store.store import Store

    return Store(uri or os.environ.get("QUANTKIT_STORE") or str(Path.cwd() / "model-store"))


@store_app.command("list")
def store_list(store: Optional[str] = StoreOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """List the artifacts in the store."""
    from rich.table import Table

    s = open_store(store)
    manifests = list(s.list())
    if as_json:
        print(json.dumps([{k: m[k] for k in ("id", "recipe", "target", "engine", "total_size", "created_at")}
                          for m in manifests], indent=2))
        return
    t = Table(title=f"{s.uri}: {len(manifests)} artifacts")
    for c in ("id", "recipe", "format", "scheme", "size MB", "created"):
        t.add_column(c)
    for m in manifests:
        t.add_row(m["id"], m["recipe"]["name"], m["target"]["format"], m["target"]["scheme"],
                  f"{m['total_size'] / 1e6:.1f}", m["created_at"])
    out.print(t)


@store_app.command("show")
def store_show(artifact_id: str, store: Optional[str] = StoreOpt) -> None:
    """Print an artifact's manifest (ID or a unique prefix)."""
    s = open_store(store)
    print(json.dumps(s.get(s.resolve_id(artifact_id)), indent=2))


@store_app.command("verify")
def store_verify(artifact_id: Optional[str] = typer.Argument(None), store: Optional[str] = StoreOpt) -> None:
    """Re-hash the files of one artifact (or all) against their manifests; exit 1 on any mismatch."""
    s = open_store(store)
    ids = [s.resolve_id(artifact_id)] if artifact_id else s.ids()
    problems = [p for i in ids for p in s.verify(i)]
    for p in problems:
        print(f"CORRUPT {p}")
    print(f"{len(ids)} artifacts checked, {len(problems)} problems")
    if problems:
        raise typer.Exit(1)
