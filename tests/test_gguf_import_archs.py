"""GGUF import that proves itself, per architecture: tiny random checkpoints (tests/tiny_models.py) converted to
GGUF by llama.cpp's own converter, imported back with `quantkit model import-gguf`, which must agree with
llama.cpp on the same token windows within 1% perplexity (or refuse in one line, exit 2, writing nothing).
Then the round trip: a GGUF target built from the import carries the source GGUF's tokenizer."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from quantkit.architectures import read_config
from quantkit.toolchain.llama_cpp import convert_env, convert_script
from tiny_models import ARCHS, GGUF_VOCAB_FROM, NO_GGUF, make_tiny

# each test converts with llama.cpp and imports in a subprocess (llama.cpp + transformers scoring): 30-90 s on
# 2 cores, over the conftest threshold; `make test` runs them, `make check` leaves them out
pytestmark = pytest.mark.slow
CONVERTIBLE = [a for a in ARCHS if a not in NO_GGUF or a in GGUF_VOCAB_FROM]  # see tiny_models.NO_GGUF
# architecture -> what the one-line refusal says (none left: every convertible family imports and agrees)
REFUSED: dict[str, str] = {}
IMPORT_CELL = {"format": "import-gguf", "engine": "llama.cpp vs transformers"}  # the support table's column


def to_gguf(model: Path, out: Path, vocab_from: Path | None = None) -> Path:
    """llama.cpp's converter; with vocab_from, the tokenizer is copied from that GGUF (formats/_gguf_vocab.py)."""
    wrap = [str(Path(__file__).resolve().parents[1] / "quantkit" / "formats" / "_gguf_vocab.py"), str(vocab_from)]
    proc = subprocess.run([sys.executable, *(wrap if vocab_from else []), str(convert_script()), str(model),
                           "--outtype", "f32", "--outfile", str(out)], capture_output=True, text=True,
                          env=convert_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


class _TinyGGUFs(dict):
    """arch -> (root, GGUF of the tiny checkpoint), made on first use (a -k selection converts only its own)."""

    def __init__(self, root: Path, tokenizer_dir: Path):
        super().__init__()
        self.root, self.tokenizer_dir = root, tokenizer_dir

    def __missing__(self, arch: str):
        model = make_tiny(arch, self.root / arch.replace(".", ""), self.tokenizer_dir)
        vocab = self[GGUF_VOCAB_FROM[arch]][1] if arch in GGUF_VOCAB_FROM else None
        self[arch] = (self.root, to_gguf(model, self.root / f"{arch}.gguf", vocab))
        return self[arch]


@pytest.fixture(scope="module")
def tiny_ggufs(smollm2, tmp_path_factory):
    """The demo model's tokenizer (tiny_models.py) makes these `slow` (conftest's marker rule): a conversion and
    a verified import per architecture are minutes on 2 cores."""
    return _TinyGGUFs(tmp_path_factory.mktemp("gguf-import"), smollm2)


@pytest.mark.parametrize("arch", CONVERTIBLE)
def test_import_agrees_with_llama_cpp_or_is_refused(tiny_ggufs, arch, request):
    cell = {"arch": arch, **IMPORT_CELL}
    request.node.user_properties.append(("arch_cell", cell))  # conftest writes it to the matrix JSON
    root, gguf = tiny_ggufs[arch]
    out = root / f"{arch}-imported"
    r = run_cli("model", "import-gguf", str(gguf), str(out))
    if arch in REFUSED:
        assert r.returncode == 2 and not out.exists(), r.stderr[-2000:]
        line = r.stderr.strip().splitlines()[-1]
        assert line.startswith(("error: import-gguf", "error: cannot import")) and REFUSED[arch] in line
        request.node.user_properties.append(("arch_cell_status", "unsupported"))
        return
    assert r.returncode == 0, r.stderr[-3000:]
    a = json.loads((out / "quantkit-import.json").read_text())["agreement"]
    cell.update(llama_cpp_ppl=a["llama_cpp_ppl"], transformers_ppl=a["transformers_ppl"],
                relative_difference=a["relative_difference"])
    assert abs(a["relative_difference"]) <= 0.01 and a["windows"] == 4
    assert "verified" in r.stdout
    # the same architecture came back (a Mixtral read as a dense Llama would also be a `llama`); llama.cpp
    # runs Mistral as `llama`, which is the same network
    src_cfg, out_cfg = read_config(root / arch.replace(".", "")), read_config(out)
    source, imported = src_cfg["model_type"], out_cfg["model_type"]
    assert imported in (source, {"mistral": "llama"}.get(source)), (source, imported)
    for experts in ("num_local_experts", "num_experts"):  # MoE: every expert came along
        assert out_cfg.get(experts) == src_cfg.get(experts), experts
    request.node.user_properties.append(("arch_cell_status", "supported"))


def test_disagreeing_import_is_refused_and_writes_nothing(tiny_ggufs, tmp_path, request):
    """A GGUF that transformers reads differently from llama.cpp: the tiny Llama plus a `rope_freqs` tensor
    (Llama 3.1's RoPE scaling factors), which llama.cpp applies and transformers' GGUF loader ignores. The query
    and key weights are scaled up so that the random model's attention depends on position at all."""
    import gguf
    import numpy as np

    request.node.user_properties.append(("arch_cell", {"arch": "llama3", **IMPORT_CELL}))
    root, src = tiny_ggufs["llama3"]
    bad = tmp_path / "rope-freqs.gguf"
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(bad), arch=arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        w.add_key_value(name, field.contents(), vtype,
                        sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        data = np.array(t.data)
        if ".attn_q." in t.name or ".attn_k." in t.name:  # sharp attention: positions (RoPE) then matter, even
            data = data * 30  # in a random model; both engines read these tensors alike
        w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    head_dim = 64 // 4
    w.add_tensor("rope_freqs.weight", np.full(head_dim // 2, 8.0, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "imported"
    r = run_cli("model", "import-gguf", str(bad), str(out))
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: import-gguf refused") and "limit 1%" in line and "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".import-*"))
    request.node.user_properties.append(("arch_cell_status", "supported"))


def test_gguf_target_from_an_import_reuses_the_source_tokenizer(tiny_ggufs, tmp_path, request):
    import gguf

    request.node.user_properties.append(("arch_cell", {"arch": "qwen3", **IMPORT_CELL}))
    root, src = tiny_ggufs["qwen3"]
    imported = tmp_path / "imported"
    r = run_cli("model", "import-gguf", str(src), str(imported))
    assert r.returncode == 0, r.stderr[-2000:]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: roundtrip\nmodel: {{source: {imported}, dtype: float32, sanity_check: false}}\n"
                      "targets: [{name: gguf, format: gguf, types: [Q8_0], llama_cpp_ppl_chunks: 0}]\n"
                      "eval: {perplexity: {datasets: [wikitext2], seq_len: 64, max_windows: 2}}\n"
                      f"store: {{uri: {tmp_path / 'store'}}}\n")
    r = run_cli("build", str(recipe), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {x["target"]: x for x in json.loads(r.stdout)["rows"]}
    assert set(rows) >= {"baseline", "gguf-q8_0"}
    from quantkit.store.store import Store

    st = Store(str(tmp_path / "store"))
    (m,) = [m for m in st.list() if m["target"]["name"] == "gguf-q8_0"]
    assert m["sanity"] == {"status": "skipped", "reason": "recipe model.sanity_check: false"}
    built = st.materialize(m["id"], tmp_path / "pulled") / m["entry"]
    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(built))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.eos_token_id"):
        assert a.fields[key].contents() == b.fields[key].contents(), key
    request.node.user_properties.append(("arch_cell_status", "supported"))
