"""GGUF through llama.cpp: HF -> F16/BF16 GGUF by llama.cpp's convert_hf_to_gguf.py, then llama.cpp's quantizer.

One target expands into one artifact per type (`types: [F16, Q8_0, Q4_K_M]` -> `{name}-f16`, `{name}-q8_0`, ...).
The converted intermediate file and the importance matrix are made once per build (files in ctx.workdir keyed
by source and calibration fingerprints) and shared by the variants.

Route choices:
- Importance matrix: mean of x^2 per input column of every linear layer, collected with PyTorch forward hooks
  on the build's model over ctx.calibration.input_ids, i.e. exactly the token windows every other format
  calibrates on. llama-imatrix would need text, and detokenizing those windows and letting llama.cpp
  re-tokenize them need not give the same ids back (and it chunks and adds BOS its own way). The matrix is
  saved in llama-imatrix's GGUF format (`{tensor}.in_sum2`, `{tensor}.counts`) as `imatrix.gguf` in each
  artifact that used it; `llama-quantize --imatrix imatrix.gguf` accepts that file.
- Quantization: the C API (llama_model_quantize) of the pinned llama-cpp-python, in-process. The type list we
  validate against is then exactly the list that quantizer accepts (the binding's LLAMA_FTYPE_* constants;
  the CLI's name table lacks some, e.g. NVFP4), and the imatrix goes in through
  llama_model_quantize_params.imatrix as the same float32 sums/counts that llama-quantize would compute.
"""
from __future__ import annotations

import ctypes
import difflib
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, StringConstraints, field_validator

from quantkit.errors import UserError
from quantkit.formats.base import Format, Produced, TargetOptions, register
from quantkit.sources.remote_code import EXIT_REFUSED, MARKER
from quantkit.sources.remote_code import FIX as REMOTE_FIX

FLOAT_TYPES = ("F32", "F16", "BF16")  # written directly by the converter
# Types whose quantizer ignores an importance matrix (float copies; ggml's quantize_q8_0 drops quant_weights):
# variants of these never use one, so they need no calibration set.
IMATRIX_UNUSED = {*FLOAT_TYPES, "Q8_0"}
TENSOR_TYPE_EXCLUDED = {"I8", "I16", "I32", "I64", "F64", "Q8_1", "Q8_K"}  # not storage types for weights


def llama_ftypes() -> dict[str, int]:
    """llama.cpp's file types by name, from the binding's LLAMA_FTYPE_* constants (not a hand list)."""
    import llama_cpp

    out = {}
    for k in dir(llama_cpp):
        if k.startswith("LLAMA_FTYPE_") and k != "LLAMA_FTYPE_GUESSED":
            out[k.removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_").removeprefix("ALL_")] = getattr(llama_cpp, k)
    return out


def ggml_tensor_types() -> dict[str, int]:
    import gguf

    return {t.name: t.value for t in gguf.GGMLQuantizationType if t.name not in TENSOR_TYPE_EXCLUDED}


def _pick(kind: str, value: str, known: dict[str, int]) -> str:
    v = value.strip().upper()
    if v in known:
        return v
    close = difflib.get_close_matches(v, list(known), n=1, cutoff=0.5)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    raise ValueError(f"unknown llama.cpp {kind} {value!r}{hint}; known: {', '.join(sorted(known))}")


def gguf_file_types() -> dict[str, int]:
    """The file types gguf-py knows (same names): validation without llama-cpp-python; building needs it."""
    import gguf

    return {t.name.removeprefix("MOSTLY_").removeprefix("ALL_"): t.value for t in gguf.LlamaFileType
            if t.name != "GUESSED"}


def _known(tables, what: str) -> dict[str, int]:
    """The first type table whose package is installed; else a ValueError (a one-line recipe error)."""
    for table in tables:
        try:
            return table()
        except ImportError:
            continue
    raise ValueError(f"cannot check llama.cpp {what}s: neither llama-cpp-python nor gguf is installed "
                     "(pip install -e . installs both)")


FileType = Annotated[str, StringConstraints(max_length=32),
                     AfterValidator(lambda v: _pick("type", v, _known((llama_ftypes, gguf_file_types), "type")))]
TensorType = Annotated[str, StringConstraints(max_length=32),
                       AfterValidator(lambda v: _pick("tensor type", v, _known((ggml_tensor_types,), "tensor type")))]


class GGUFOptions(TargetOptions):
    format: Literal["gguf"] = "gguf"
    types: list[FileType] = Field(default_factory=lambda: ["Q4_K_M"], min_length=1, max_length=64)
    imatrix: bool = False
    output_tensor_type: TensorType | None = None
    token_embedding_type: TensorType | None = None
    intermediate: Literal["F16", "BF16", "F32"] = "F16"  # what convert_hf_to_gguf.py writes before quantizing
    llama_cpp_ppl_chunks: int | None = Field(32, ge=0, le=1 << 20)  # llama.cpp-protocol WikiText-2 chunks; 0 skip, null all
    bench_reps: int = Field(5, ge=0, le=1000)  # llama-bench repetitions for pp512/tg128; 0 skips the measurement

    @field_validator("types")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = [t for t, n in Counter(v).items() if n > 1]
        if dup:
            raise ValueError(f"type {dup[0]} listed twice")
        return v


def _workfile(ctx, name: str) -> Path:
    d = ctx.workdir / "gguf"
    d.mkdir(parents=True, exist_ok=True)
    return d / name


def convert(ctx, outtype: str) -> Path:
    """The HF source as a GGUF of `outtype`, converted once per build (cached by source fingerprint)."""
    from quantkit.toolchain.llama_cpp import convert_env, convert_script

    out = _workfile(ctx, f"{ctx.source.fingerprint[:16]}-{outtype}.gguf")
    if out.exists():
        return out
    tmp = out.with_suffix(".part")
    # The converter loads some tokenizers with trust_remote_code=True hard-coded: run it under quantkit's guard,
    # which refuses a checkpoint's own code unless the recipe allows it.
    allow = ["--allow"] if ctx.recipe.model.trust_remote_code else []
    cmd = [sys.executable, "-m", "quantkit.sources.remote_code", *allow,
           *_vocab_wrapper(ctx.source.path), str(convert_script()), str(ctx.source.path),
           "--outtype", outtype.lower(), "--outfile", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=convert_env(), errors="replace")
    if proc.returncode == EXIT_REFUSED and MARKER in proc.stderr:
        why = proc.stderr[proc.stderr.index(MARKER) + len(MARKER):].strip().splitlines()[0]
        raise UserError(f"convert_hf_to_gguf.py needs remote code for {ctx.source.path}: {why}", fix=REMOTE_FIX)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise UserError(f"convert_hf_to_gguf.py failed on {ctx.source.path}: {tail}",
                        fix="check that llama.cpp supports this architecture")
    tmp.replace(out)
    return out


def _vocab_wrapper(model_dir: Path) -> list[str]:
    """A model imported from a GGUF converts with that GGUF's own tokenizer (formats/_gguf_vocab.py)."""
    import json

    record = Path(model_dir) / "quantkit-import.json"
    source = json.loads(record.read_text()).get("source") if record.is_file() else None
    if not source or not Path(source).is_file():
        return []
    return [str(Path(__file__).with_name("_gguf_vocab.py")), source]


def _gguf_arch(reader) -> tuple[str, int]:
    arch = reader.fields["general.architecture"].contents()
    return arch, int(reader.fields[f"{arch}.block_count"].contents())


def compute_imatrix(ctx, gguf_path: Path) -> tuple[Path, dict]:
    """Hooks on the build's model over the shared calibration windows -> imatrix GGUF (cached per build)."""
    import gguf
    import numpy as np
    import torch

    calib = ctx.calibration
    out = _workfile(ctx, f"imatrix-{ctx.source.fingerprint[:12]}-{calib.fingerprint[:12]}.gguf")
    n, seq_len = calib.input_ids.shape
    reader = gguf.GGUFReader(str(gguf_path))
    arch, n_blocks = _gguf_arch(reader)
    n_in = {t.name: int(t.shape[0]) for t in reader.tensors}  # ggml ne[0] = input features
    meta = {"method": "pytorch forward hooks: mean of x^2 per input column over the calibration windows",
            "chunks": n, "chunk_size": seq_len, "tokens": n * seq_len, "calibration": calib.fingerprint}
    if out.exists():
        return out, {**meta, "entries": len(gguf.GGUFReader(str(out)).tensors) // 2}
    arch_enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(arch_enum, n_blocks)
    model = ctx.base_model
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        g = names.get_name(mod_name)
        # only weights the GGUF has (a tied lm_head is token_embd there, which llama.cpp does not weight)
        if g is None or n_in.get(f"{g}.weight") != mod.in_features:
            continue
        key = f"{g}.weight"
        sums[key] = torch.zeros(mod.in_features, dtype=torch.float64)

        def hook(_m, args, key=key):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            sums[key] += (x * x).sum(0)
        hooks.append(mod.register_forward_pre_hook(hook))
    if not sums:
        raise UserError(f"no linear layer of the model maps to a tensor of {gguf_path.name} ({arch})",
                        fix="set imatrix: false for this architecture")
    try:
        with torch.inference_mode():
            for start in range(0, n, 4):
                model(input_ids=calib.input_ids[start:start + 4].to(model.device))
    finally:
        for h in hooks:
            h.remove()
    w = gguf.GGUFWriter(str(out.with_suffix(".part")), arch=arch)
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", [f"quantkit calibration {calib.fingerprint[:16]} "
                                     f"({calib.meta.get('origin', '?')}, {n} x {seq_len} tokens)"])
    w.add_uint32("imatrix.chunk_count", n)
    w.add_uint32("imatrix.chunk_size", seq_len)
    for key, s in sums.items():
        w.add_tensor(f"{key}.in_sum2", s.numpy().astype(np.float32).reshape(1, -1))
        w.add_tensor(f"{key}.counts", np.array([[n * seq_len]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out.with_suffix(".part").replace(out)
    return out, {**meta, "entries": len(sums)}


def read_imatrix(path: Path) -> dict[str, "object"]:
    """Per-tensor importance as llama-quantize derives it from the file: float32 in_sum2 / counts."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(path))
    t = {x.name: np.asarray(x.data, dtype=np.float32).reshape(-1) for x in r.tensors}
    return {k[:-8]: t[k] / t[k[:-8] + ".counts"][0] for k in t if k.endswith(".in_sum2")}


def quantize(src: Path, dst: Path, ftype: int, *, imatrix: dict | None, threads: int,
             output_tensor_type: int | None = None, token_embedding_type: int | None = None) -> list[str]:
    """llama_model_quantize through the binding; returns llama.cpp's log lines (warnings, fallbacks)."""
    import llama_cpp
    from llama_cpp import _logger

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, threads
    if output_tensor_type is not None:
        params.output_tensor_type = output_tensor_type
    if token_embedding_type is not None:
        params.token_embedding_type = token_embedding_type
    keep = []  # the C side reads these during the call
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            keep.append(values)
            arr[i].name = name.encode()
            arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = values.size
        arr[len(imatrix)].name = None
        params.imatrix = ctypes.cast(arr, type(params.imatrix))
        keep.append(arr)
    log: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level, text, _user):
        log.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    lines = "".join(log).splitlines()
    if rc != 0:
        why = " ".join(x.strip() for x in lines if "ERROR" in x or "error" in x)[:300] or f"return code {rc}"
        fix = "set imatrix: true" if "importance matrix" in why else "see llama.cpp's message"
        raise UserError(f"llama.cpp could not quantize to {dst.stem}: {why}", fix=fix)
    return lines


def gguf_facts(path: Path) -> dict:
    """What was actually written: tensor type mix, parameter count, bits per weight, key metadata."""
    import gguf

    r = gguf.GGUFReader(str(path))
    mix = Counter(t.tensor_type.name for t in r.tensors)
    n_params = sum(int(t.n_elements) for t in r.tensors)
    n_bytes = sum(int(t.n_bytes) for t in r.tensors)
    meta = {k: r.fields[k].contents() for k in ("general.architecture", "general.file_type",
                                                 "tokenizer.ggml.model", "tokenizer.ggml.pre")
            if k in r.fields}
    return {"tensor_types": dict(sorted(mix.items(), key=lambda kv: -kv[1])), "tensors": len(r.tensors),
            "n_params": n_params, "tensor_bytes": n_bytes, "bits_per_weight": round(8 * n_bytes / n_params, 4),
            "file_size": path.stat().st_size, "metadata": meta}


def llama_cpp_eval_text() -> tuple[str, dict]:
    """WikiText-2 test as llama.cpp's tables use it (wiki.test.raw): HF rows with blank lines restored."""
    from quantkit.calibration import load_texts
    from quantkit.util import sha256_json

    src = load_texts("wikitext2", "test")
    text = "".join(d or " \n" for d in src.docs)
    return text, {"dataset": "wikitext2", "split": "test", "file": "wiki.test.raw", "origin": src.origin,
                  "dataset_sha256": src.sha256, "text_sha256": sha256_json(text)}


@register
class GGUF(Format):
    name = "gguf"
    Options = GGUFOptions
    libraries = ("torch", "transformers", "gguf", "llama_cpp_python")
    cost = (30.0, 15.0, 0.0)  # convert + quantize + llama.cpp checks; the imatrix is one calibration pass

    def needs_calibration(self, opts: GGUFOptions) -> bool:
        return opts.imatrix and any(t not in IMATRIX_UNUSED for t in opts.types)

    def variants(self, opts: GGUFOptions) -> list[GGUFOptions]:
        # imatrix is switched off where the type ignores it, so those variants need (and key on) no calibration
        return [opts.model_copy(update={"name": f"{opts.name}-{t.lower()}", "types": [t],
                                        "imatrix": opts.imatrix and t not in IMATRIX_UNUSED})
                for t in opts.types]

    def describe(self, opts: GGUFOptions) -> str:
        return "GGUF " + "/".join(opts.types) + ("+imatrix" if opts.imatrix else "")

    def produce(self, ctx, opts: GGUFOptions, out_dir: Path) -> Produced:
        from quantkit.evaluation.engines.llama_cpp_engine import bench, default_threads, llama_cpp_perplexity

        (qtype,) = opts.types
        tp = ctx.recipe.eval.throughput
        threads = (tp.threads if tp and tp.threads else None) or default_threads()
        out = out_dir / f"{Path(ctx.source.path).name}-{qtype}.gguf"
        overrides = opts.output_tensor_type or opts.token_embedding_type
        t0 = time.perf_counter()
        base = qtype if qtype in FLOAT_TYPES else opts.intermediate
        src = convert(ctx, base)
        info: dict = {"type": qtype, "ftype": llama_ftypes()[qtype], "threads": threads,
                      "converted_by": "convert_hf_to_gguf.py", "intermediate": base,
                      # the report's llama.cpp speedups divide by the dense GGUF measured in the same engine
                      "dense_reference": qtype in FLOAT_TYPES and not overrides}
        imat_values = None
        if opts.imatrix:
            imat_path, imat_meta = compute_imatrix(ctx, src)
            shutil.copyfile(imat_path, out_dir / "imatrix.gguf")
            imat_values = read_imatrix(imat_path)
            info["imatrix"] = {"used": True, "file": "imatrix.gguf", **imat_meta}
        else:
            info["imatrix"] = {"used": False}
        if qtype in FLOAT_TYPES and not overrides:
            shutil.copyfile(src, out)  # the converter's output is the artifact
            log = []
        else:
            types = ggml_tensor_types()
            log = quantize(src, out, llama_ftypes()[qtype], imatrix=imat_values, threads=threads,
                           output_tensor_type=types.get(opts.output_tensor_type or ""),
                           token_embedding_type=types.get(opts.token_embedding_type or ""))
        info["produce_s"] = round(time.perf_counter() - t0, 2)
        info.update(gguf_facts(out))
        # llama.cpp falls back from k-quants when a row is not a multiple of 256 (SmolLM2: 576); say how often
        info["fallback_warnings"] = [x.strip() for x in log if "fallback" in x]
        if opts.llama_cpp_ppl_chunks != 0:
            text, text_meta = llama_cpp_eval_text()
            info["llama_cpp_perplexity"] = {**llama_cpp_perplexity(out, text, 512, opts.llama_cpp_ppl_chunks,
                                                                   threads), **text_meta}
        if opts.bench_reps:
            info["throughput"] = bench(out, 512, 128, opts.bench_reps, threads)
        return Produced(entry=out.name, engine="llama.cpp", info=info)
