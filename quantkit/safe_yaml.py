"""Read a YAML file that a user wrote (recipes, dataset definitions) without ever crashing or hanging.

PyYAML's safe_load still expands aliases (a "billion laughs" file of a few hundred bytes becomes gigabytes),
recurses once per nesting level (RecursionError on `[[[[...`), keeps the last of duplicate keys silently and
turns `on:`/`yes:` keys into booleans. This reader bounds the file size and nesting depth, refuses aliases,
duplicate and non-string keys, and decodes strictly as UTF-8, each with a UserError naming file and line.
The pure-Python composer is used (the C one cannot be hooked for depth/aliases); MAX_BYTES keeps it fast.
"""
from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import yaml

from quantkit.errors import UserError

# Real recipes are a few KB with ~200 nodes. The pure-Python parser costs ~50 us per node on a busy 2-core
# host, so these bounds keep any file well under a second.
MAX_BYTES = 128 * 1024
MAX_NODES = 5000
MAX_DEPTH = 24  # recipe nesting is at most ~6 levels (targets[i].gates.x); options dicts a few more
STR_TAG = "tag:yaml.org,2002:str"
NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
# plain data only: no !!binary (bytes), !!timestamp (dates), !!set, !!omap or application tags
PLAIN_TAGS = {STR_TAG, *NUMBER_TAGS, "tag:yaml.org,2002:bool", "tag:yaml.org,2002:null"}


class _BoundedLoader(yaml.SafeLoader):
    depth = 0
    nodes = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            ev = self.peek_event()
            raise _Refused("YAML aliases (*name) are not allowed in recipes", ev.start_mark,
                           "write the value out, or share it through `extends:`")
        self.depth += 1
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _Refused(f"more than {MAX_NODES} values", self.peek_event().start_mark, "is this a recipe?")
        if self.depth > MAX_DEPTH:
            raise _Refused(f"nesting deeper than {MAX_DEPTH} levels", self.peek_event().start_mark,
                           "flatten the document")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _Refused(Exception):
    def __init__(self, problem: str, mark, fix: str):
        super().__init__(problem)
        self.problem, self.mark, self.fix = problem, mark, fix


def _check_nodes(node: yaml.Node, path: Path, what: str) -> None:
    """Duplicate or non-string keys are mistakes a dict would hide; tags beyond plain data are surprises;
    refuse them with the line."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, yaml.MappingNode):
            if n.tag != "tag:yaml.org,2002:map":
                _bad_tag(n, path, what)
            seen: dict[str, int] = {}
            for k, v in n.value:
                line = k.start_mark.line + 1
                if not isinstance(k, yaml.ScalarNode):
                    raise UserError("a key must be a plain string, not a list or mapping", where=f"{path}:{line}")
                if k.tag != STR_TAG:
                    raise UserError(f"key {k.value[:40]!r} is not a plain string", where=f"{path}:{line}",
                                    fix="quote the key (YAML reads yes/no/on/off/numbers/null as other types)")
                if k.value == "<<":
                    raise UserError("YAML merge keys (<<) are not allowed in recipes", where=f"{path}:{line}",
                                    fix="use `extends:` to share settings")
                if k.value in seen:
                    raise UserError(f"key {k.value[:60]!r} appears twice (first at line {seen[k.value]})",
                                    where=f"{path}:{line}", fix="keep one of them")
                seen[k.value] = line
                stack.append(v)
        elif isinstance(n, yaml.SequenceNode):
            if n.tag != "tag:yaml.org,2002:seq":
                _bad_tag(n, path, what)
            stack.extend(n.value)
        elif n.tag not in PLAIN_TAGS:
            _bad_tag(n, path, what)
        elif n.tag in NUMBER_TAGS and len(n.value) > 40:  # no recipe number has 40 digits
            raise UserError(f"number {n.value[:20]}... is {len(n.value)} characters long",
                            where=f"{path}:{n.start_mark.line + 1}", fix="give a number in a sane range")


def plain_path(s: str, max_len: int = 1024) -> bool:
    """A string usable as a file path: bounded, no control characters (a NUL makes os calls raise)."""
    return 0 < len(s) <= max_len and not any(ord(c) < 32 or c == "\x7f" for c in s)


def _bad_tag(n: yaml.Node, path: Path, what: str) -> None:
    shown = n.tag.replace("tag:yaml.org,2002:", "!!")
    raise UserError(f"YAML tag {shown[:40]} is not allowed in a {what}", where=f"{path}:{n.start_mark.line + 1}",
                    fix="plain values only; quote a value to make it a string")


def read_text(path: Path, what: str = "recipe", max_bytes: int = MAX_BYTES) -> str:
    """The file as UTF-8 text; one-line UserError for a missing, special, huge or non-UTF-8 file."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{what} {path} is not a regular file", fix="give the path of a YAML file")
        if st.st_size > max_bytes:
            raise UserError(f"{what} file is {st.st_size} bytes; the limit is {max_bytes}", where=f"{path}:1",
                            fix="is this the right file?")
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise UserError(f"{what} file not found: {path}", fix="check the path") from None
    except (OSError, ValueError) as e:  # permissions, a NUL in the path, a name too long ...
        raise UserError(f"cannot read {what} file {str(path)[:200]!r}: {type(e).__name__}: {e}") from None
    if len(raw) > max_bytes:
        raise UserError(f"{what} file is larger than {max_bytes} bytes", where=f"{path}:1")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); a {what} must be a "
                        "UTF-8 YAML file", where=f"{path}:{line}") from None


def load(path: Path, what: str = "recipe") -> tuple[Any, yaml.Node | None]:
    """(data, root node) of one YAML document, bounded and strict. The node keeps line numbers."""
    text = read_text(path, what)
    loader = None
    try:
        loader = _BoundedLoader(text)  # its reader already refuses control characters
        node = loader.get_single_node()
        if node is not None:
            _check_nodes(node, path, what)
        data = loader.construct_document(node) if node is not None else None
    except _Refused as e:
        raise UserError(e.problem, where=f"{path}:{e.mark.line + 1}", fix=e.fix) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise UserError(f"invalid YAML: {e.problem or e.context}", where=f"{path}:{line}",
                        fix="check indentation and quoting") from None
    except yaml.reader.ReaderError as e:  # a control character; carries an offset, not a mark
        code = ord(e.character) if isinstance(e.character, str) else int(e.character)
        raise UserError(f"invalid YAML: control character U+{code:04X} is not allowed",
                        where=f"{path}:{text[:e.position].count(chr(10)) + 1}", fix="remove it") from None
    except yaml.YAMLError as e:
        raise UserError(f"invalid YAML: {type(e).__name__}", where=f"{path}:1") from None
    except (ValueError, OverflowError, RecursionError) as e:  # e.g. an integer of more than 4300 digits
        raise UserError(f"invalid value: {str(e)[:120]}", where=f"{path}:1") from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, node
