"""Property-based fuzzing of `quantkit recipe validate` (hypothesis).

Every input is one of the repository's real recipes, mutated: keys deleted, renamed or added at any depth,
values replaced by wrong types, huge/negative/non-finite numbers, bad strings and bytes; then, for some, the
YAML text itself is broken (random bytes, truncation, aliases, deep nesting, tags, tabs, Latin-1).
The contract for each: exit 0 with one `ok` line, or exit 2 with exactly one `error:` line on stderr, no
traceback, in under 2 s. Run in-process through the CLI's own `main`. The full draw (1,000 recipes) is `slow`;
the fast lane (`make check`) draws 150 with the same strategies and contract.
Time is the process's CPU time: on a shared, overloaded host wall time measures the neighbours, not quantkit
(both are printed; on an idle CI runner they agree).
"""
from __future__ import annotations

import copy
import io
import resource
import shutil
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from quantkit import cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
DOCS = {p.name: yaml.safe_load(p.read_text()) for p in RECIPES}
EXAMPLES = [pytest.param(150, id="150"), pytest.param(1000, id="1000", marks=pytest.mark.slow)]
LIMIT_S = 2.0

NAMEISH = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
WEIRD = st.one_of(
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.sampled_from([0, -1, 1, 15, 2 ** 31, 2 ** 63, 10 ** 30, 1e308, -0.0]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.text(alphabet="\x00\n\r\t\u2028\u0085\x1b/.\\ :*&!{}[]#'\"", max_size=12),
    st.sampled_from(["x" * 5000, "../../etc/passwd", "/abs/path", "a/b", "", " ", "C:\\x", "~", "nul\x00byte"]),
    st.binary(max_size=24),
    st.none(), st.booleans(),
    st.lists(st.integers(min_value=-5, max_value=10 ** 6), max_size=4),
    st.dictionaries(NAMEISH, st.integers(), max_size=3),
)


def _paths(node, prefix=()):
    """Every (container, key) pair in the document, depth first."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((node, k, prefix + (k,)))
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.append((node, i, prefix + (i,)))
            out += _paths(v, prefix + (i,))
    return out


def _mutate_doc(draw, doc):
    for _ in range(draw(st.integers(1, 4))):
        spots = _paths(doc)
        if not spots:
            doc = draw(WEIRD)
            continue
        parent, key, _ = draw(st.sampled_from(spots))
        op = draw(st.sampled_from(["delete", "rename", "typo", "retype", "add", "wrap"]))
        if op == "delete":
            del parent[key]
        elif op == "retype":
            parent[key] = draw(WEIRD)
        elif op == "wrap":
            parent[key] = draw(st.sampled_from([[parent[key]], {"value": parent[key]}]))
        elif isinstance(parent, dict) and op in ("rename", "typo"):
            new = draw(NAMEISH) if op == "rename" else _typo(draw, str(key))
            parent[new] = parent.pop(key)
        elif isinstance(parent, dict):
            parent[draw(NAMEISH)] = draw(WEIRD)
        else:
            parent.insert(key, draw(WEIRD))
    return doc


def _typo(draw, key: str) -> str:
    if not key:
        return "x"
    i = draw(st.integers(0, len(key) - 1))
    return draw(st.sampled_from([key[:i] + key[i + 1:], key[:i] + key[i] * 2 + key[i + 1:], key.upper(),
                                 key.replace("_", "-"), key + "s"])) or "x"


def _bomb(k: int) -> bytes:
    lines = [b'l0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &a{i} [{','.join(['*a' + str(i - 1)] * 9)}]".encode() for i in range(1, k)]
    return b"\n".join(lines) + b"\n"


TEXT_TRICKS = {
    "bytes": lambda t, d: _at(t, d, d(st.binary(min_size=1, max_size=8))),
    "truncate": lambda t, d: t[:d(st.integers(0, len(t)))],
    "alias": lambda t, d: t + b"\nzz: &anchor [1, 2]\nyy: *anchor\n",
    "bomb": lambda t, d: _bomb(d(st.integers(2, 12))) + t,
    "nest": lambda t, d: t + b"\nnested: " + b"[" * (n := d(st.integers(10, 20000))) + b"]" * n + b"\n",
    "nest_map": lambda t, d: t + b"\n" + b"".join(b" " * i + b"k:\n" for i in range(d(st.integers(10, 400)))),
    "dup_line": lambda t, d: _dup(t, d),
    "latin1": lambda t, d: t.decode().encode("latin-1", errors="replace") + b"\n# caf\xe9\n",
    "bom": lambda t, d: b"\xef\xbb\xbf" + t,
    "utf16": lambda t, d: t.decode().encode("utf-16"),
    "tab": lambda t, d: t.replace(b"  ", b"\t", 1),
    "tag": lambda t, d: t.replace(b": ", b": " + d(st.sampled_from([b"!!python/object/apply:os.system ", b"!!binary ",
                                                                     b"!!set ", b"!custom ", b"!!timestamp "])), 1),
    "huge": lambda t, d: t + b"\n#" + b"x" * 300_000,
    "bignum": lambda t, d: t.replace(b"seed: 0", b"seed: " + b"9" * d(st.integers(20, 6000)), 1),
    "multi_doc": lambda t, d: t + b"\n---\n" + t,
    "crlf": lambda t, d: t.replace(b"\n", b"\r\n"),
    "nul": lambda t, d: _at(t, d, b"\x00"),
}


def _at(t: bytes, d, insert: bytes) -> bytes:
    i = d(st.integers(0, len(t)))
    return t[:i] + insert + t[i:]


def _dup(t: bytes, d) -> bytes:
    lines = t.split(b"\n")
    i = d(st.integers(0, len(lines) - 1))
    return b"\n".join(lines[:i + 1] + [lines[i]] + lines[i + 1:])


@st.composite
def mutated_recipe(draw):
    name = draw(st.sampled_from(sorted(DOCS)))
    doc = _mutate_doc(draw, copy.deepcopy(DOCS[name])) if draw(st.integers(0, 9)) else copy.deepcopy(DOCS[name])
    try:
        text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False).encode("utf-8", errors="surrogateescape")
    except Exception:
        text = yaml.safe_dump(doc, sort_keys=False).encode()
    trick = None
    if draw(st.integers(0, 2)) == 0:
        trick = draw(st.sampled_from(sorted(TEXT_TRICKS)))
        text = TEXT_TRICKS[trick](text, draw)
    return name, trick, text


def run_main(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            cli.main(args)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def check_contract(code: int, out: str, err: str, seconds: float) -> str | None:
    """What is wrong with one run, or None."""
    if "Traceback" in out + err:
        return "traceback"
    if seconds >= LIMIT_S:
        return f"took {seconds:.2f} s of CPU"
    if code == 0:
        return None if len(out.splitlines()) == 1 and ": ok (" in out and not err else "exit 0 without one ok line"
    if code != 2:
        return f"exit code {code}: {err.strip()[:300]}"
    lines = err.splitlines()
    if len(lines) != 1 or not lines[0].startswith("error: ") or out:
        return f"not exactly one error line: {err[:300]!r}"
    return None


@pytest.mark.parametrize("examples", EXAMPLES)
def test_fuzzed_recipes_exit_0_or_one_line_exit_2(tmp_path, examples):
    work = tmp_path / "recipes"
    shutil.copytree(ROOT / "recipes" / "base", work / "base")
    target = work / "fuzz.yaml"
    stats = {"inputs": 0, "accepted": 0, "rejected": 0, "failures": [], "slowest": (0.0, "")}
    assert run_main(["recipe", "validate", str(RECIPES[0])])[0] == 0  # warm: imports are not the inputs' cost
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    # derandomize: the same draw every run (CI must not flake: a random draw of 150 once gave 1 accepted recipe,
    # under the floor of 3 below; this one gives 17 of 150 and 51 of 1,000)
    @settings(max_examples=examples, deadline=None, database=None, print_blob=True, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(mutated_recipe())
    def one(case):
        name, trick, text = case
        target.write_bytes(text)
        t0, c0 = time.perf_counter(), time.process_time()
        code, out, err = run_main(["recipe", "validate", str(target)])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        stats["inputs"] += 1
        stats["accepted" if code == 0 else "rejected"] += 1
        if code != 0 and cpu > stats["slowest"][0]:
            stats["slowest"] = (cpu, f"{wall * 1000:.0f} ms wall; {name} + {trick}: {err.strip()[:160]}")
        problem = check_contract(code, out, err, cpu)
        if problem:
            stats["failures"].append((name, trick, problem))
        assert problem is None, (name, trick, problem, text[:400])

    t0 = time.perf_counter()
    one()
    total = time.perf_counter() - t0
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    slow_s, slow_what = stats["slowest"]
    print(f"\nfuzz: {stats['inputs']} inputs ({stats['accepted']} accepted, {stats['rejected']} rejected), "
          f"{len(stats['failures'])} failures, {total:.1f} s total, slowest rejection {slow_s * 1000:.0f} ms CPU "
          f"({slow_what}), peak RSS growth {grew_mb:.0f} MB")
    assert stats["inputs"] >= examples and not stats["failures"]
    assert stats["accepted"] >= examples // 50 and stats["rejected"] >= examples // 2  # both sides of the contract exercised
    assert grew_mb < 300


ARG_VALUES = st.one_of(st.integers(min_value=-(2 ** 70), max_value=2 ** 70).map(str),
                       st.floats().map(str), st.text(max_size=12),
                       st.sampled_from(["", "-", "--", "nan", "inf", "1e309", "0", "-1", "H100-80GB", "fp8", "bf16"]))
PLAN_OPTIONS = ["--gpu", "--gpus", "--batch", "--context", "--kv-dtype", "--reserve-pct", "--store", "--bogus"]


def test_fuzzed_cli_arguments_exit_0_or_one_line_exit_2(tmp_path):
    """`quantkit plan` (all its options are numbers or names) with random values: never a traceback."""
    config = tmp_path / "config.json"
    config.write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, '
                      '"intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, '
                      '"num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": true}')
    seen = {"inputs": 0, "exit_0": 0, "exit_2": 0}

    @settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.sampled_from(PLAN_OPTIONS), ARG_VALUES), max_size=4))
    def one(options):
        argv = ["plan", str(tmp_path), "--json"] + [x for pair in options for x in pair]
        c0 = time.process_time()
        code, out, err = run_main(argv)
        seen["inputs"] += 1
        seen[f"exit_{code}"] = seen.get(f"exit_{code}", 0) + 1
        assert "Traceback" not in out + err and code in (0, 2), (argv, code, err[-500:])
        assert code == 0 or (len(err.splitlines()) == 1 and err.startswith("error: ")), (argv, err)
        assert time.process_time() - c0 < LIMIT_S

    one()
    print(f"\ncli fuzz: {seen}")
    assert seen["inputs"] >= 200 and seen["exit_0"] > 0 and seen["exit_2"] > 0
