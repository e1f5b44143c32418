"""Load a recipe file: YAML with positions, `extends:` merging, schema and per-format validation.

Every problem becomes one UserError line: `file:line: field.path: what was expected (did you mean ...)`.
PyYAML's composer keeps node positions, which pydantic's errors lack; we map error paths back to lines.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from quantkit.errors import UserError
from quantkit import safe_yaml
from quantkit.recipe.schema import Recipe

Pos = tuple[str, int]  # (file, 1-based line)
MAX_EXTENDS = 8


@dataclass
class LoadedRecipe:
    recipe: Recipe
    path: Path
    raw: dict[str, Any]  # merged document, before defaults
    targets: list[BaseModel] = field(default_factory=list)  # per-format validated options

    @property
    def hash(self) -> str:
        """Hash of the resolved recipe (defaults applied), stable across key order and comments."""
        blob = json.dumps(self.recipe.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def resolved(self) -> dict[str, Any]:
        doc = self.recipe.model_dump(mode="json")
        doc["targets"] = [t.model_dump(mode="json") for t in self.targets]
        return doc


def _positions(node: yaml.Node, file: str, path: tuple = (), out: dict | None = None) -> dict[tuple, Pos]:
    out = {} if out is None else out
    out.setdefault(path, (file, node.start_mark.line + 1))
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            out[path + (key,)] = (file, k.start_mark.line + 1)
            _positions(v, file, path + (key,), out)
            out[path + (key,)] = (file, k.start_mark.line + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _positions(v, file, path + (i,), out)
    return out


def _read_yaml(path: Path) -> tuple[dict, dict[tuple, Pos]]:
    data, node = safe_yaml.load(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError("a recipe must be a YAML mapping (key: value)", where=f"{path}:1")
    return data, _positions(node, str(path)) if node is not None else {}


def _merge(base: Any, over: Any) -> Any:
    """Deep-merge mappings; lists and scalars in `over` replace the base's (targets are replaced by name)."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base[k], v) if k in base else v
        return out
    return over


def _load_with_extends(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict, dict[tuple, Pos]]:
    path = path.resolve()
    if path in seen:
        raise UserError(f"`extends` cycle: {' -> '.join(str(p) for p in seen + (path,))}",
                        where=f"{path}:1", fix="remove one of the extends links")
    data, pos = _read_yaml(path)
    base_ref = data.pop("extends", None)
    if base_ref is None:
        return data, pos
    if not isinstance(base_ref, str) or not safe_yaml.plain_path(base_ref):
        raise UserError("extends: expected a path to another recipe file", where=_at(pos, ("extends",), path))
    if len(seen) >= MAX_EXTENDS:
        raise UserError(f"extends: more than {MAX_EXTENDS} levels", where=_at(pos, ("extends",), path))
    base_path = (path.parent / base_ref)
    if not base_path.is_file():
        raise UserError(f"extends: base recipe {base_ref!r} not found (looked at {base_path})",
                        where=_at(pos, ("extends",), path), fix="give a path relative to this recipe")
    base, base_pos = _load_with_extends(base_path, seen + (path,))
    merged_pos = dict(base_pos)
    merged_pos.update(pos)
    return _merge(base, data), merged_pos


def _at(pos: dict[tuple, Pos], loc: tuple, default_file: Path | str) -> str:
    """The file:line of the deepest known prefix of loc."""
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in pos:
            f, line = pos[loc[:cut]]
            return f"{f}:{line}"
    return f"{default_file}:1"


def _fmt_loc(loc: tuple) -> str:
    s = ""
    for part in loc:
        s += f"[{part}]" if isinstance(part, int) else (f".{part}" if s else str(part))
    return s or "(top level)"


def _did_you_mean(word: str, model: type[BaseModel] | None) -> str:
    if model is None:
        return ""
    close = difflib.get_close_matches(word, list(model.model_fields), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """Walk the pydantic model tree along loc to the model that owns the last key."""
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        f = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if f is None:
            return None
        ann = f.annotation
        for cand in getattr(ann, "__args__", ()) + (ann,):
            inner = getattr(cand, "__args__", (cand,))
            for c in inner:
                if isinstance(c, type) and issubclass(c, BaseModel):
                    model = c
                    break
            else:
                continue
            break
        else:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def raise_validation(err: ValidationError, pos: dict, file: Path, prefix: tuple = (),
                     model: type[BaseModel] | None = None) -> None:
    e = err.errors()[0]
    loc = prefix + tuple(e["loc"])
    where = _at(pos, loc, file)
    field_path = _fmt_loc(loc)
    if e["type"] == "extra_forbidden":
        owner = _model_at(model, tuple(e["loc"])) if model else None
        hint = _did_you_mean(str(loc[-1]), owner)
        allowed = ", ".join(owner.model_fields) if owner else ""
        raise UserError(f"{field_path}: unknown field{hint}" + (f"; allowed: {allowed}" if allowed else ""),
                        where=where) from None
    if e["type"] == "missing":
        raise UserError(f"{field_path}: required field is missing", where=where,
                        fix=f"add `{loc[-1]}:`") from None
    got = e.get("input")
    got_s = f", got {json.dumps(got, default=str)[:60]}" if not isinstance(got, (dict, list)) else ""
    raise UserError(f"{field_path}: {e['msg'].replace(chr(10), ' ')}{got_s}", where=where) from None


def _check_datasets(recipe: Recipe, pos: dict, path: Path) -> None:
    """Dataset names must be defined (calibration/*.yaml); a misspelt one would fail only after model loading."""
    from quantkit.calibration import dataset_names, is_dataset_file

    known = dataset_names()
    c = recipe.calibration
    named = [] if c.path or is_dataset_file(c.dataset) else [(("calibration", "dataset"), c.dataset)]
    if recipe.eval.perplexity:
        named += [(("eval", "perplexity", "datasets", i), d) for i, d in enumerate(recipe.eval.perplexity.datasets)]
    for loc, name in named:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise UserError(f"{_fmt_loc(loc)}: unknown dataset {name[:60]!r}{hint}; defined: {', '.join(known)}",
                            where=_at(pos, loc, path), fix="use a defined name or a .txt/.jsonl/.parquet file")


def load_recipe(path: str | Path) -> LoadedRecipe:
    from quantkit.formats import UNAVAILABLE, format_names, get_format  # late: keeps `import` cheap

    path = Path(path)
    data, pos = _load_with_extends(path)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise_validation(err, pos, path, model=Recipe)
    targets = []
    for i, t in enumerate(recipe.targets):
        raw_t = data["targets"][i]
        try:
            fmt = get_format(t.format)
            if fmt.internal:
                raise KeyError(t.format)
        except KeyError:
            if t.format in UNAVAILABLE:
                raise UserError(f"targets[{i}].format: format {t.format!r} cannot be loaded here: "
                                f"{UNAVAILABLE[t.format]}", where=_at(pos, ("targets", i, "format"), path),
                                fix="install its dependencies (pip install -e .), or fix or remove the plugin"
                                ) from None
            close = difflib.get_close_matches(t.format, format_names(), n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise UserError(f"targets[{i}].format: unknown format {t.format!r}{hint}; known: "
                            f"{', '.join(format_names())}", where=_at(pos, ("targets", i, "format"), path)) from None
        try:
            targets.append(fmt.Options.model_validate(raw_t))
        except ValidationError as err:
            raise_validation(err, pos, path, prefix=("targets", i), model=fmt.Options)
        except UserError as err:  # format-level semantic checks raise UserError without a position
            err.where = err.where or _at(pos, ("targets", i), path)
            raise
        except Exception as err:  # a validator (a plugin's, say) that fails in its own code: still one line
            raise UserError(f"targets[{i}]: format {t.format!r} could not check its options: "
                            f"{type(err).__name__}: {err}", where=_at(pos, ("targets", i), path)) from None
    _check_datasets(recipe, pos, path)
    return LoadedRecipe(recipe=recipe, path=path, raw=data, targets=targets)
