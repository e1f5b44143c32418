"""`quantkit store ...` commands: inspect and maintain a model store (a local path, file:// or s3://...)."""
from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

store_app = typer.Typer(help="Inspect and maintain the model store.", no_args_is_help=True)
StoreOpt = typer.Option(None, "--store", help="store URI: a path, file://..., s3://bucket/prefix "
                        "(default: recipe store.uri, $QUANTKIT_STORE, ./model-store)")
out = Console(width=None if os.isatty(1) else 160)


class GateStatus(str, Enum):
    passed = "passed"
    failed = "failed"


def open_store(uri: Optional[str], must_exist: bool = True):
    """The store to read. Reading never creates one (a typo in --store must not make a bucket): a store that
    does not exist is one line and exit 2, unless the caller treats it as empty (must_exist=False)."""
    from quantkit.errors import UserError
    from quantkit.store.store import Store

    st = Store(uri or os.environ.get("QUANTKIT_STORE") or str(Path.cwd() / "model-store"))
    if must_exist and not st.exists():
        raise UserError(f"no store at {st.uri} (nothing was ever published there)",
                        fix="check --store / $QUANTKIT_STORE / the recipe's store.uri")
    return st


@store_app.command("list")
def store_list(store: Optional[str] = StoreOpt, as_json: bool = typer.Option(False, "--json"),
               model: Optional[str] = typer.Option(None, help="only artifacts whose source uri contains this"),
               fmt: Optional[str] = typer.Option(None, "--format", help="only this format (fp8, gguf, ...)"),
               recipe: Optional[str] = typer.Option(None, help="only artifacts of this recipe name"),
               gate: Optional[GateStatus] = typer.Option(None, help="only artifacts whose gate passed/failed under "
                                                         "--recipe-file's current gates"),
               recipe_file: Optional[Path] = typer.Option(None, "--recipe-file", help="judge artifacts by this "
                                                          "recipe's current gates (the gate column, --gate)")) -> None:
    """List the artifacts in the store."""
    from rich.table import Table

    from quantkit.errors import UserError
    from quantkit.store.maintain import matches

    if gate and not recipe_file:
        raise UserError("--gate needs --recipe-file RECIPE: verdicts are computed from a recipe's current gates, "
                        "not stored", fix=f"quantkit store list --gate {gate.value} --recipe-file recipes/NAME.yaml")
    s = open_store(store)
    manifests = [m for m in s.list() if matches(m, model=model, fmt=fmt, recipe=recipe)]
    verdict = {}
    if recipe_file:
        from quantkit.gates import from_recipe_file

        verdict = {i: v["status"] for i, v in from_recipe_file(recipe_file, manifests).items()}
    if gate:
        manifests = [m for m in manifests if verdict.get(m["id"]) == gate.value]
    if as_json:
        print(json.dumps([{**{k: m[k] for k in ("id", "recipe", "target", "engine", "total_size", "created_at")},
                           "model": m.get("source", {}).get("uri"), "gate": verdict.get(m["id"])}
                          for m in manifests], indent=2))
        return
    t = Table(title=f"{s.uri}: {len(manifests)} artifacts")
    for c in ("id", "recipe", "format", "scheme", "size MB", "gate", "created"):
        t.add_column(c)
    for m in manifests:
        t.add_row(m["id"], m["recipe"]["name"], m["target"]["format"], m["target"]["scheme"],
                  f"{m['total_size'] / 1e6:.1f}", verdict.get(m["id"]) or "-", m["created_at"])
    out.print(t)


@store_app.command("show")
def store_show(artifact_id: str, store: Optional[str] = StoreOpt) -> None:
    """Print an artifact's manifest (ID or a unique prefix), the newest measurements merged into `metrics`;
    every measurement added after publishing, oldest first, is under `eval_history`."""
    s = open_store(store)
    i = s.resolve_id(artifact_id)
    history = [{"record": p.rsplit("/", 1)[-1], **r} for p, r in s.eval_records(i)]
    print(json.dumps({**s.get(i), **({"eval_history": history} if history else {})}, indent=2))


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


@store_app.command("pull")
def store_pull(artifact_id: str, to: Path = typer.Option(..., "--to", help="directory to create (must be new "
                                                          "or empty)"),
               store: Optional[str] = StoreOpt) -> None:
    """Materialize an artifact as the plain directory its engine loads, checking every file's sha256."""
    s = open_store(store)
    i = s.resolve_id(artifact_id)
    m = s.get(i)
    s.materialize(i, to)
    print(f"pulled {i} -> {to} ({len(m['files'])} files, {m['total_size'] / 1e6:.1f} MB, all hashes ok; "
          f"engine {m['engine']}, entry {m['entry']})")


@store_app.command("push")
def store_push(artifact_ids: Optional[list[str]] = typer.Argument(None, help="IDs or unique prefixes"),
               to: str = typer.Option(..., "--to", help="destination store URI"),
               all_: bool = typer.Option(False, "--all", help="push every artifact"),
               store: Optional[str] = StoreOpt) -> None:
    """Copy entries to another store (e.g. local -> s3://...): blobs first, manifest last."""
    from quantkit.errors import UserError
    from quantkit.store.maintain import push

    s = open_store(store)
    if not artifact_ids and not all_:
        raise UserError("name the artifacts to push, or --all")
    ids = s.ids() if all_ else [s.resolve_id(a) for a in artifact_ids]
    r = push(s, open_store(to, must_exist=False), ids)
    for i in r.entries:
        print(f"pushed {i}")
    print(f"{len(r.entries)} pushed, {len(r.already)} already there; {r.blobs_copied} blobs "
          f"({r.bytes_copied / 1e6:.1f} MB) copied, {r.bytes_deduped / 1e6:.1f} MB already present")


@store_app.command("rm")
def store_rm(artifact_ids: list[str] = typer.Argument(..., help="IDs or unique prefixes"),
             store: Optional[str] = StoreOpt) -> None:
    """Remove entries (their manifests and eval records); the blobs are freed by `gc`."""
    s = open_store(store)
    for i in [s.resolve_id(a) for a in artifact_ids]:
        s.remove(i)
        print(f"removed {i}")


@store_app.command("gc")
def store_gc(older_than: str = typer.Option("24h", "--older-than", help="only remove what is older than this "
                                            "(30m, 24h, 7d); protects publishes in flight"),
             dry_run: bool = typer.Option(False, "--dry-run", help="only say what would go"),
             store: Optional[str] = StoreOpt) -> None:
    """Remove unreferenced blobs and staging leftovers older than --older-than; never a referenced blob."""
    from quantkit.store.maintain import gc, parse_age

    s = open_store(store)
    r = gc(s, parse_age(older_than), dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    print(f"{verb} {len(r.blobs)} unreferenced blobs ({r.blob_bytes / 1e6:.1f} MB), {len(r.tmp)} staging files, "
          f"{len(r.evals)} orphaned eval records, {len(r.uploads)} unfinished uploads; kept {r.live_blobs} "
          f"referenced blobs and {r.kept_young} unreferenced ones younger than {older_than}")
