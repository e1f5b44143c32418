"""GGUF through llama.cpp's own tools: convert_hf_to_gguf.py -> F16/BF16 GGUF, llama-imatrix, llama-quantize.

One target expands into one artifact per type (`types: [F16, Q8_0, Q4_K_M]` -> `{name}-f16`, `{name}-q8_0`, ...).
The converted intermediate file and the importance matrix are made once per build (files in ctx.workdir keyed
by source and calibration fingerprints) and shared by the variants.

- Importance matrix: `llama-imatrix` over the build's calibration windows, written out as text (decoded from the
  shared token ids; llama.cpp re-tokenizes them, so its chunks are the same text, not necessarily the same ids),
  one chunk per window (`-c seq_len --chunks num_samples`). Saved as `imatrix.gguf` in each artifact that used it.
- Quantization: `llama-quantize [--imatrix imatrix.gguf] F16.gguf OUT.gguf TYPE THREADS`. The type names we
  validate against are the ones that tool lists in its usage (parsed, not a hand list).
- Measuring is the evaluation layer's job: the artifact declares the llama.cpp perplexity protocol
  (`llama-perplexity`) as a check; its engine ("llama.cpp") times it with `llama-bench`.
"""
from __future__ import annotations

import difflib
import functools
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, StringConstraints, field_validator

from quantkit.errors import UserError
from quantkit.formats.base import Check, Format, Produced, TargetOptions, register
from quantkit.sources.remote_code import EXIT_REFUSED, MARKER
from quantkit.sources.remote_code import FIX as REMOTE_FIX
from quantkit.toolchain import llama_cpp as toolchain
from quantkit.toolchain.gguf_file import gguf_summary

FLOAT_TYPES = ("F32", "F16", "BF16")  # written directly by the converter
# Types whose quantizer ignores an importance matrix (float copies; ggml's quantize_q8_0 drops quant_weights):
# variants of these never use one, so they need no calibration set.
IMATRIX_UNUSED = {*FLOAT_TYPES, "Q8_0"}
TENSOR_TYPE_EXCLUDED = {"I8", "I16", "I32", "I64", "F64", "Q8_1", "Q8_K"}  # not storage types for weights


@functools.lru_cache(maxsize=None)
def llama_ftypes() -> dict[str, int]:
    """llama.cpp's file types by name, as the pinned `llama-quantize` lists them in its usage."""
    proc = subprocess.run([str(toolchain.find_tool("llama-quantize")), "--help"], capture_output=True, text=True)
    found = re.findall(r"^\s+(\d+)\s+or\s+(\S+)\s+:", proc.stdout + proc.stderr, re.M)
    if not found:
        raise UserError("llama-quantize --help listed no quantization types", fix=toolchain.SETUP_FIX)
    return {name.upper(): int(num) for num, name in found}


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
    llama_cpp_ppl_chunks: int | None = Field(32, ge=0, le=1 << 20)  # llama-perplexity WikiText-2 chunks; 0 skip, null all

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


def imatrix_placement(gguf_path: Path, threads: int) -> tuple[list[str], str]:
    """(llama-imatrix's offload arguments, where it runs: the manifest's record). Decided here, not left to
    llama.cpp's `-ngl auto`, so the record says what ran: a CPU build computes on the CPU; a CUDA build puts
    every layer on the GPU(s) when the model fits (as quantkit's own whole-model forwards do), else as many
    layers as fit, the rest on the CPU."""
    from quantkit.placement import probe, whole_model_device_map

    backend = toolchain.backend_of(toolchain.find_tool("llama-imatrix"))
    host = probe() if backend == "cuda" else None  # probe() sees the devices this process can use
    if host is None or not host.cuda_devices:
        why = "llama.cpp CUDA build, no CUDA device visible" if backend == "cuda" else f"llama.cpp {backend} build"
        return (["-ngl", "0"] if backend == "cuda" else []), f"cpu ({why}; {threads} threads)"
    device_map, where = whole_model_device_map(gguf_path.stat().st_size, host)
    if device_map == {"": 0}:
        return ["-ngl", "all", "-sm", "none", "-mg", "0"], f"{where}, every layer (llama.cpp CUDA build, -ngl all)"
    return ["-ngl", "auto"], (f"{host.cuda_devices} x {host.gpu_name}: the layers that fit, the rest on the CPU "
                              "(llama.cpp CUDA build, -ngl auto)")


def compute_imatrix(ctx, gguf_path: Path, threads: int) -> tuple[Path, dict]:
    """llama-imatrix over the shared calibration windows (as text) -> imatrix GGUF (cached per build)."""
    import gguf

    calib = ctx.calibration
    offload, ctx.devices["importance matrix"] = imatrix_placement(gguf_path, threads)
    out = _workfile(ctx, f"imatrix-{ctx.source.fingerprint[:12]}-{calib.fingerprint[:12]}.gguf")
    n, seq_len = calib.input_ids.shape
    meta = {"method": "llama-imatrix over the calibration windows (decoded, re-tokenized by llama.cpp)",
            "chunk_size": seq_len, "calibration": calib.fingerprint}
    if not out.exists():
        text = _workfile(ctx, f"calibration-{calib.fingerprint[:12]}.txt")
        text.write_text("".join(ctx.tokenizer.decode(row, skip_special_tokens=False) for row in calib.input_ids))
        part = out.with_suffix(".part.gguf")
        proc = toolchain.run_tool("llama-imatrix", ["-m", gguf_path, "-f", text, "-c", seq_len, "--chunks", n,
                                                    "-t", threads, "-o", part, "--no-ppl", *offload],
                                  log_path=_workfile(ctx, "llama-imatrix.log"))
        over = re.search(r"computing over (\d+) chunks", proc.stdout + proc.stderr)
        (out.parent / (out.name + ".chunks")).write_text(over.group(1) if over else "")
        part.replace(out)
    chunks = (out.parent / (out.name + ".chunks")).read_text()
    return out, {**meta, "chunks": int(chunks) if chunks else None,
                 "entries": len(gguf.GGUFReader(str(out)).tensors) // 2}


def quantize(src: Path, dst: Path, qtype: str, *, imatrix: Path | None, threads: int,
             output_tensor_type: str | None = None, token_embedding_type: str | None = None,
             log_path: Path | None = None) -> list[str]:
    """llama-quantize; returns its log lines (warnings, fallbacks)."""
    args: list = []
    if imatrix is not None:
        args += ["--imatrix", imatrix]
    if output_tensor_type:
        args += ["--output-tensor-type", output_tensor_type]
    if token_embedding_type:
        args += ["--token-embedding-type", token_embedding_type]
    try:
        proc = toolchain.run_tool("llama-quantize", [*args, src, dst, qtype, threads], log_path=log_path)
    except RuntimeError as e:
        why = " ".join(x.strip() for x in str(e).splitlines() if "error" in x.lower())[:300] or str(e)[-300:]
        fix = "set imatrix: true" if "importance matrix" in why else "see llama.cpp's message"
        raise UserError(f"llama-quantize could not quantize to {qtype}: {why}", fix=fix) from None
    return (proc.stdout + proc.stderr).splitlines()


def gguf_facts(path: Path) -> dict:
    """What was actually written: tensor type mix, parameter count, bits per weight, key metadata."""
    g = gguf_summary(path)
    mix = Counter(t.type for t in g.tensors)
    n_params = sum(t.n_elements for t in g.tensors)
    n_bytes = sum(t.n_bytes for t in g.tensors)
    return {"tensor_types": dict(sorted(mix.items(), key=lambda kv: -kv[1])), "tensors": len(g.tensors),
            "n_params": n_params, "tensor_bytes": n_bytes, "bits_per_weight": round(8 * n_bytes / n_params, 4),
            "file_size": path.stat().st_size, "metadata": dict(g.metadata)}


@register
class GGUF(Format):
    name = "gguf"
    Options = GGUFOptions
    libraries = ("torch", "transformers", "gguf", "llama_cpp_python")
    cost = (30.0, 15.0, 0.0)  # convert + quantize + llama.cpp checks; the imatrix is one calibration pass
    needs_model = False  # llama.cpp's tools read the converted file; the build's in-memory model is not used

    def needs_calibration(self, opts: GGUFOptions) -> bool:
        return opts.imatrix and any(t not in IMATRIX_UNUSED for t in opts.types)

    def build_profile(self, opts: GGUFOptions) -> tuple[str, str]:
        return ("whole", "imatrix") if opts.imatrix else ("convert", "gguf")

    def variants(self, opts: GGUFOptions) -> list[GGUFOptions]:
        # imatrix is switched off where the type ignores it, so those variants need (and key on) no calibration
        return [opts.model_copy(update={"name": f"{opts.name}-{t.lower()}", "types": [t],
                                        "imatrix": opts.imatrix and t not in IMATRIX_UNUSED})
                for t in opts.types]

    def describe(self, opts: GGUFOptions) -> str:
        return "GGUF " + "/".join(opts.types) + ("+imatrix" if opts.imatrix else "")

    def produce(self, ctx, opts: GGUFOptions, out_dir: Path) -> Produced:
        (qtype,) = opts.types
        tp = ctx.recipe.eval.throughput
        threads = (tp.threads if tp and tp.threads else None) or toolchain.default_threads()
        out = out_dir / f"{Path(ctx.source.path).name}-{qtype}.gguf"
        overrides = opts.output_tensor_type or opts.token_embedding_type
        t0 = time.perf_counter()
        base = qtype if qtype in FLOAT_TYPES else opts.intermediate
        src = convert(ctx, base)
        info: dict = {"type": qtype, "ftype": llama_ftypes()[qtype], "threads": threads,
                      "converted_by": "convert_hf_to_gguf.py", "intermediate": base,
                      # the report's llama.cpp speedups divide by the dense GGUF measured in the same engine
                      "dense_reference": qtype in FLOAT_TYPES and not overrides}
        imat = None
        if opts.imatrix:
            imat, imat_meta = compute_imatrix(ctx, src, threads)
            shutil.copyfile(imat, out_dir / "imatrix.gguf")
            info["imatrix"] = {"used": True, "file": "imatrix.gguf", **imat_meta}
        else:
            info["imatrix"] = {"used": False}
        # llama.cpp's converter and llama-quantize are CPU programs, whatever the build
        ctx.devices["convert"] = "cpu (convert_hf_to_gguf.py)"
        if qtype in FLOAT_TYPES and not overrides:
            shutil.copyfile(src, out)  # the converter's output is the artifact
            log = []
        else:
            ctx.devices["quantize"] = f"cpu (llama-quantize, {threads} threads)"
            log = quantize(src, out, qtype, imatrix=imat, threads=threads,
                           output_tensor_type=opts.output_tensor_type, token_embedding_type=opts.token_embedding_type,
                           log_path=_workfile(ctx, f"llama-quantize-{opts.name}.log"))
            info["quantized_by"] = "llama-quantize"
        info["produce_s"] = round(time.perf_counter() - t0, 2)
        info.update(gguf_facts(out))
        # llama.cpp falls back from k-quants when a row is not a multiple of 256 (SmolLM2: 576); say how often
        info["fallback_warnings"] = [x.strip() for x in log if "fallback" in x]
        checks = []
        if opts.llama_cpp_ppl_chunks != 0:  # llama.cpp's own perplexity protocol, run by the evaluation layer
            checks.append(Check("llama-perplexity", {"n_ctx": 512, "chunks": opts.llama_cpp_ppl_chunks,
                                                     "threads": threads}))
        return Produced(entry=out.name, engine="llama.cpp", info=info, checks=checks)
