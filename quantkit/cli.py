"""The `quantkit` command. Tables and JSON go to stdout; progress and logs to stderr.
Bad input: one line on stderr and exit code 2 (a traceback only with --debug)."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

import quantkit
from quantkit.errors import GateFailed, UserError, one_line

app = typer.Typer(help="Recipe-driven quantization: build, evaluate and store model artifacts.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
recipe_app = typer.Typer(help="Check and print recipes.", no_args_is_help=True)
model_app = typer.Typer(help="Prepare model sources.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
app.add_typer(model_app, name="model")
# Tables must not be squeezed to 80 columns when stdout is a pipe or a CI log.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
from quantkit.store.cli import StoreOpt, store_app  # noqa: E402

app.add_typer(store_app, name="store")


def _version(value: bool) -> None:
    if value:
        print(f"quantkit {quantkit.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit"),
          debug: bool = typer.Option(False, "--debug", help="show tracebacks for errors")) -> None:
    """quantkit: one recipe in, FP8/INT8/GPTQ/AWQ/GGUF/TensorRT-LLM artifacts out, measured and stored."""


@contextlib.contextmanager
def _stdout_to_stderr():
    """Libraries (llm-compressor's loguru sink, tqdm) print to stdout; stdout is reserved for the table/JSON.
    Redirect at the file-descriptor level so output from C extensions moves too."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _open_store(uri: Optional[str], must_exist: bool = True):
    from quantkit.store.cli import open_store

    return open_store(uri, must_exist)


@app.command()
def build(recipe: Path = typer.Argument(..., help="recipe YAML"),
          target: Optional[list[str]] = typer.Option(None, "--target", help="build only this target (repeat for "
                                                     "several; CI fan-out)"),
          executor: str = typer.Option("inprocess", "--executor", help="where targets run: inprocess, or "
                                       "ray[:ADDRESS] (one Ray task per target)"),
          as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
          no_sanity_check: bool = typer.Option(False, "--no-sanity-check", help="skip the check that the "
                                               "baseline is a working model (recorded in every manifest)"),
          store: Optional[str] = StoreOpt,
          report_dir: Optional[Path] = typer.Option(None, help="where report.md/json go "
                                                    "(default ./reports/<recipe name>)")) -> None:
    """Build every target of RECIPE (skipping artifacts already in the store), evaluate, publish, report."""
    from quantkit.build import run_build
    from quantkit.progress import BuildProgress
    from quantkit.recipe.loader import load_recipe
    from quantkit import gates, report

    loaded = load_recipe(recipe)
    with _stdout_to_stderr():
        result = run_build(loaded, only_target=target, store=store, console=err, executor=executor,
                           progress=BuildProgress(err), no_sanity_check=no_sanity_check)
    verdicts = gates.verdicts(loaded.recipe.gates, loaded.targets, result.manifests)  # the recipe's gates now
    rows = gates.apply(report.rows(result.manifests), verdicts)
    title = f"{loaded.recipe.name}: {len(result.built)} built, {len(result.cached)} from store"
    paths = report.write_reports(rows, report_dir or Path("reports") / loaded.recipe.name, loaded.recipe.name)
    if as_json:
        print(json.dumps({"recipe": loaded.recipe.name, "built": result.built, "cached": result.cached,
                          "rows": rows, "stages": result.stages, "reports": [str(p) for p in paths]}, indent=2))
    else:
        report.print_table(rows, out, title)
        err.print(f"reports: {', '.join(str(p) for p in paths)}")
    failures = gates.failures(verdicts, result.manifests)
    if failures:
        for f in failures:
            print(f"gate failed: {f}", file=sys.stderr)
        raise GateFailed(f"{len(failures)} artifact(s) failed the recipe's gates (published anyway)")


@recipe_app.command("validate")
def recipe_validate(file: Path) -> None:
    """Check FILE against the schema and every target's format options."""
    from quantkit.recipe.loader import load_recipe

    from quantkit.architectures import local_config, target_problems
    from quantkit.formats import PLUGIN_PROBLEMS

    loaded = load_recipe(file)
    for problem in PLUGIN_PROBLEMS:  # a broken plugin the recipe does not use: say so, once, and go on
        print(one_line(f"warning: {problem}"), file=sys.stderr)
    problems = target_problems(local_config(loaded.recipe.model.source, loaded.path.parent), loaded.targets)
    if problems:
        raise UserError(f"{file}: " + problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""),
                        fix="drop the target, or use a format that supports this architecture")
    print(f"{file}: ok ({loaded.recipe.name}, {len(loaded.targets)} targets)")


@recipe_app.command("show")
def recipe_show(file: Path) -> None:
    """Print FILE resolved: `extends` merged and every default filled in."""
    import yaml

    from quantkit.recipe.loader import load_recipe

    print(yaml.safe_dump(load_recipe(file).resolved(), sort_keys=False), end="")


@model_app.command("import-gguf")
def model_import_gguf(file: Path, out_dir: Path) -> None:
    """Import a GGUF file into a dense HF checkpoint (safetensors) at OUT_DIR."""
    from quantkit.sources.gguf_import import import_gguf

    with _stdout_to_stderr():
        path = import_gguf(file, out_dir)
    a = json.loads((path / "quantkit-import.json").read_text())["agreement"]
    print(f"imported {file} -> {path} (verified: wikitext2 ppl {a['transformers_ppl']:.3f} in transformers vs "
          f"{a['llama_cpp_ppl']:.3f} in llama.cpp on the same {a['windows']}x{a['seq_len']} tokens, "
          f"{a['relative_difference']:+.3%})")


@app.command("report")
def report_cmd(store: Optional[str] = StoreOpt,
               recipe: Optional[str] = typer.Option(None, help="only artifacts of this recipe name"),
               model: Optional[str] = typer.Option(None, help="only artifacts whose source uri contains this"),
               fmt: str = typer.Option("md", "--format", help="md | csv | json | html"),
               recipe_file: Optional[Path] = typer.Option(None, "--recipe-file", help="judge the rows by this "
                                                          "recipe's current gates (only its artifacts)")) -> None:
    """Render the comparison table over the store's contents."""
    from quantkit import gates, report

    manifests = [m for m in _open_store(store).list() if recipe in (None, m["recipe"]["name"])
                 and (model is None or model in m["source"]["uri"])]
    rs = report.rows(manifests)
    if recipe_file:
        gates.apply(rs, gates.from_recipe_file(recipe_file, manifests))
    if fmt not in report.RENDERERS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(report.RENDERERS)}")
    print(report.RENDERERS[fmt](rs), end="")


@app.command()
def plan(recipe_or_model: str = typer.Argument(..., help="a recipe YAML, a model dir / config.json, or a hub id"),
         gpu: str = typer.Option("H100-80GB", help="GPU name from quantkit/data/gpus.yaml"),
         gpus: int = typer.Option(1, min=1, max=4096, help="number of GPUs (tensor parallel)"),
         batch: int = typer.Option(32, min=1, max=1 << 20, help="concurrent sequences"),
         context: int = typer.Option(4096, min=1, max=1 << 24, help="tokens per sequence (prompt + generation)"),
         kv_dtype: str = typer.Option("bf16", help="KV cache dtype: bf16 | fp16 | fp8"),
         reserve_pct: float = typer.Option(10.0, min=0, max=99, help="% of GPU memory reserved for activations/runtime"),
         host_ram: Optional[str] = typer.Option(None, help="host RAM of the build machine, e.g. 128GB: adds the "
                                                "per-target build plan (host/GPU memory, time) for a recipe"),
         store: Optional[str] = StoreOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Which artifact fits which GPU: weights + KV cache + reserve, and the largest batch that fits; with
    --host-ram, what building each target needs (and a refusal when one cannot fit)."""
    from rich.table import Table

    from quantkit import planner
    from quantkit.formats import format_names, get_format

    kv_bytes = {"bf16": 2, "fp16": 2, "fp8": 1}.get(kv_dtype)
    if kv_bytes is None:
        raise UserError(f"--kv-dtype {kv_dtype!r}: expected bf16, fp16 or fp8")
    candidates = []
    gpu = planner.resolve_gpu(gpu)
    build_needs = None
    if recipe_or_model.endswith((".yaml", ".yml")):
        from quantkit.recipe.loader import load_recipe

        loaded = load_recipe(recipe_or_model)
        config = planner.recipe_config(loaded.recipe.model, loaded.path.parent)
        shape = planner.shape_from_config(config)
        if host_ram is not None:
            from quantkit import build_plan

            build_needs = build_plan.plan_recipe(loaded, config, gpu, gpus, build_plan.parse_bytes(host_ram))
        built = {m["target"]["name"]: m for m in _open_store(store or loaded.recipe.store.uri, must_exist=False).list()
                 if m["recipe"]["name"] == loaded.recipe.name}
        candidates.append(planner.nominal_candidate("baseline (16-bit)", shape, None))
        for t in loaded.targets:
            fmt = get_format(t.format)
            for v in fmt.variants(t):
                m = built.get(v.name)
                extra = tuple(m["info"].get("not_loaded") or ()) if m else ()
                weights = m and sum(f["size"] for f in m["files"] if f["path"].endswith((".safetensors", ".gguf"))
                                    and not f["path"].startswith(extra or ("\0",)))
                if weights:
                    candidates.append(planner.Candidate(v.name, weights, f"store artifact {m['id']}"))
                else:
                    candidates.append(planner.nominal_candidate(v.name, shape, fmt.nominal_bits(v) or 16))
    else:
        if host_ram is not None:
            raise UserError("--host-ram plans a build: give a recipe YAML",
                            fix="quantkit plan RECIPE --host-ram 128GB")
        shape = planner.shape_from_config(planner.load_config(recipe_or_model))
        candidates.append(planner.nominal_candidate("baseline (16-bit)", shape, None))
        for name in format_names():
            fmt = get_format(name)
            try:
                opts = fmt.Options(name=name, format=name)
            except Exception:  # formats whose options have required fields have no default to plan for
                continue
            for v in fmt.variants(opts):
                bits = fmt.nominal_bits(v)
                if bits:
                    candidates.append(planner.nominal_candidate(f"{v.name} ({fmt.describe(v)})", shape, bits))
    rows = planner.plan_rows(shape, candidates, gpu, gpus, batch, context, kv_bytes, reserve_pct)
    if as_json:
        print(json.dumps({"shape": shape.__dict__, "rows": rows,
                          **({"build": [n.__dict__ for n in build_needs]} if build_needs else {})}, indent=2))
        return
    t = Table(title=f"{recipe_or_model} on {gpus} x {gpu}, batch {batch}, context {context}, KV {kv_dtype}, "
                    f"reserve {reserve_pct:g}%")
    for c in ("artifact", "weights GB", "KV GB", "reserve GB", "need GB", "capacity GB", "fits", "max batch",
              "basis"):
        t.add_column(c, justify="left" if c in ("artifact", "basis", "fits") else "right")
    for r in rows:
        t.add_row(r["name"], f"{r['weights_gb']:.2f}", f"{r['kv_gb']:.2f}", f"{r['reserve_gb']:.1f}",
                  f"{r['need_gb']:.2f}", f"{r['capacity_gb']:.0f}", "fits" if r["fits"] else "does not fit",
                  str(r["max_batch"]), r["basis"])
    out.print(t)
    if build_needs is not None:
        from quantkit import build_plan

        out.print(build_plan.table(build_needs, f"building {recipe_or_model} on {gpus} x {gpu}, host RAM {host_ram}"))
        build_plan.refuse_unfit(build_needs)


@functools.lru_cache(maxsize=1)
def _command():
    """The click command tree, built once (typer rebuilds it on every `app()` call: ~40 ms)."""
    return typer.main.get_command(app)


def _click_exceptions() -> tuple[tuple, tuple, tuple]:
    """(usage errors, no-args-help, aborts) of click and of the copy of click that typer >= 0.2x vendors."""
    import click

    mods = [click.exceptions]
    try:
        from typer._click import exceptions as vendored  # private, but it is what typer's commands raise

        mods.append(vendored)
    except ImportError:
        pass
    return (tuple(m.ClickException for m in mods), tuple(m.NoArgsIsHelpError for m in mods),
            tuple(getattr(m, "Abort", typer.Abort) for m in mods))


def main(argv: list[str] | None = None) -> None:
    """Every failure ends as one line on stderr: bad input (UserError, a bad CLI argument) exit 2, a failed
    gate 3, anything unexpected 1 (`--debug` shows the traceback instead)."""
    usage_errors, no_args_help, aborts = _click_exceptions()
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        # standalone_mode=False: click raises usage errors to us instead of printing a boxed multi-line usage
        rc = _command().main(args=argv, prog_name="quantkit", standalone_mode=False)
    except no_args_help as e:  # `quantkit` or `quantkit store` alone: show the help
        print(e.ctx.get_help() if e.ctx else "quantkit --help")
        sys.exit(2)
    except usage_errors as e:  # usage errors: unknown command/option, bad or missing value
        if debug:
            raise
        where = f"{e.ctx.command_path}: " if getattr(e, "ctx", None) else ""
        print(one_line(f"error: {where}{e.format_message()} (see --help)"), file=sys.stderr)
        sys.exit(2)
    except (UserError, GateFailed) as e:
        if debug:
            raise
        print(e.one_line() if isinstance(e, UserError) else one_line(f"error: {e}"), file=sys.stderr)
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, *aborts):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a bug, not bad input: still one line; the traceback is one flag away
        if debug:
            raise
        print(one_line(f"error: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)"),
              file=sys.stderr)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
