"""Code identity: a digest of the source of the quantkit modules that produce an artifact, so that a change to
a format's code (or to a helper it uses) changes that format's artifact ids, and nothing else's.

The modules are found by reading imports, not by importing: a module's closure is itself, the packages above it
and every quantkit module it imports (at the top or inside a function), transitively. Imports under
`if TYPE_CHECKING:` only name types and are left out. A package version alone would not do: quantkit's has
not changed since the first commit, while packing, export and calibration code did.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

import quantkit
from quantkit.util import sha256_json

PACKAGE_ROOT = Path(quantkit.__file__).resolve().parent  # .../quantkit
TOP = "quantkit"
# what every format's output also depends on: how the model is loaded and the calibration set is drawn
SHARED_PRODUCERS = ("quantkit.context", "quantkit.calibration")


def _file(name: str, root: Path) -> Path | None:
    parts = name.split(".")
    if parts[0] != TOP:
        return None
    base = root.joinpath(*parts[1:])
    for f in (base / "__init__.py", base.with_suffix(".py")):
        if f.is_file():
            return f
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Module names a file imports (absolute and relative; `from pkg import sub` yields pkg and pkg.sub)."""
    out: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def closure(modules: tuple[str, ...], root: Path = PACKAGE_ROOT) -> dict[str, Path]:
    """Every quantkit module (name -> file) the given modules run, found by following imports."""
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        f = _file(name, root)
        if f is None:
            continue
        seen[name] = f
        parents = name.split(".")
        todo += [".".join(parents[:i]) for i in range(1, len(parents))]  # importing a.b.c runs a and a.b
        todo += [m for m in _imported(ast.parse(f.read_bytes(), str(f)), name, f.name == "__init__.py")
                 if m.split(".")[0] == TOP]
    return seen


def _digest(files: dict[str, Path], root: Path) -> str:
    return sha256_json(sorted((str(p.relative_to(root)), hashlib.sha256(p.read_bytes()).hexdigest())
                              for p in files.values()))


@lru_cache(maxsize=64)
def code_identity(module: str, root: Path = PACKAGE_ROOT) -> str:
    """Digest of the code that produces a format's artifacts: its module (`type(fmt).__module__`), the shared
    producers, and all they import within quantkit. A plugin format outside quantkit adds its own file."""
    files = closure((module, *SHARED_PRODUCERS), root)
    extra = []
    if module.split(".")[0] != TOP:  # a third-party format: its own module's bytes, and the quantkit code it uses
        spec = importlib.util.find_spec(module)
        if spec and spec.origin and Path(spec.origin).is_file():
            origin = Path(spec.origin)
            extra = [module, hashlib.sha256(origin.read_bytes()).hexdigest()]
            tree = ast.parse(origin.read_bytes(), str(origin))
            more = {m for m in _imported(tree, module, origin.name == "__init__.py") if m.split(".")[0] == TOP}
            files.update(closure(tuple(more), root))
    return sha256_json([_digest(files, root), extra])
