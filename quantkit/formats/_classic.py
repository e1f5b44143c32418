"""Classic exports (GPTQ v1, AWQ GEMM) written next to the compressed-tensors checkpoint, each proven by a
readback: the layout's own reader dequantizes the written files, compressed-tensors' decompressor dequantizes
the checkpoint with the same fp16 scales, and every layer must agree bit for bit (else the build fails).

The readback goes in chunks of layers, so memory stays bounded on a 70B checkpoint (one 50 GB shard)."""
from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path

from quantkit.errors import UserError

CHUNK_PARAMS = 1 << 28  # weights per readback chunk: ~2.5 GB of temporaries in the reader


def _layouts():
    from quantkit.formats.layouts import awq_gemm, gptq_v1

    return {"gptq": ("gptq-v1", gptq_v1.write_gptq_v1, gptq_v1.read_gptq_v1, ("qweight", "qzeros", "scales", "g_idx")),
            "awq": ("awq-gemm", awq_gemm.write_awq_gemm, awq_gemm.read_awq_gemm, ("qweight", "qzeros", "scales"))}


def export_classic(kind: str, ct_dir: Path, target: str, **writer_kwargs) -> dict:
    """Write the `kind` layout into ct_dir/<subdir> and check it; returns the manifest record."""
    sub, write, read, suffixes = _layouts()[kind]
    try:
        summary = write(ct_dir, ct_dir / sub, **writer_kwargs)
    except ValueError as e:  # the layout cannot express this checkpoint (e.g. a GPTQ v1 zero point of 0)
        raise UserError(f"export {kind}: {e}", where=f"target {target}", fix=f"remove `{kind}` from export") from None
    check = readback(ct_dir, ct_dir / sub, read, suffixes)
    if check["max_abs_diff"] != 0.0 or check["missing"] or check["extra"]:
        raise RuntimeError(f"target {target}: the {kind} export does not read back bit-exactly: {check}")
    qcfg = summary.get("quantize_config") or summary.get("quantization_config")
    return {"dir": sub, "layers": len(summary["layers"]), "quantization_config": qcfg,
            "bytes": sum(f.stat().st_size for f in (ct_dir / sub).rglob("*") if f.is_file()),
            "max_abs_dw_vs_original_scale": summary["max_abs_dw_vs_original_scale"], "readback": check}


def _ct_scheme(ct_dir: Path):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    qc = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    weights = {json.dumps(g["weights"], sort_keys=True) for g in qc["config_groups"].values()}
    if len(weights) != 1:
        raise RuntimeError(f"{ct_dir}: classic layouts need one weight scheme, found {len(weights)}")
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs.model_validate_json(weights.pop()))


def _shards(d: Path) -> list[Path]:
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        return [d / n for n in sorted(set(json.loads(idx.read_text())["weight_map"].values()))]
    return [d / "model.safetensors"]


def readback(ct_dir: Path, classic_dir: Path, read, suffixes: tuple[str, ...]) -> dict:
    """max |reader(classic) - compressed_tensors.decompress(ct, fp16 scale)| over every quantized layer."""
    import torch
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from safetensors import safe_open

    scheme = _ct_scheme(ct_dir)
    stats = {"layers": 0, "max_abs_diff": 0.0, "missing": [], "extra": [], "reference": "compressed-tensors "
             "PackedQuantizationCompressor.decompress with weight_scale cast to fp16"}
    with ExitStack() as stack:
        ct = {p: stack.enter_context(safe_open(str(p), framework="pt")) for p in _shards(ct_dir)}
        ct_where = {k: h for h in ct.values() for k in h.keys()}
        ct_layers = {k.rsplit(".", 1)[0] for k in ct_where if k.endswith(".weight_packed")}
        seen = set()
        for layers in _classic_chunks(classic_dir, read, suffixes, stack):
            for mod, r in layers.items():
                seen.add(mod)
                if mod not in ct_layers:
                    continue
                sd = {k.rsplit(".", 1)[1]: ct_where[k].get_tensor(k) for k in
                      (f"{mod}.{s}" for s in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"))
                      if k in ct_where}
                sd["weight_scale"] = sd["weight_scale"].to(torch.float16)
                ref = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
                if ref.shape != r["weight"].shape or ref.dtype != r["weight"].dtype:
                    diff = float("inf")
                else:
                    diff = float((ref.float() - r["weight"].float()).abs().max())
                stats["max_abs_diff"] = max(stats["max_abs_diff"], diff)
                stats["layers"] += 1
        stats["missing"] = sorted(ct_layers - seen)
        stats["extra"] = sorted(seen - ct_layers)
    return stats


def _classic_chunks(classic_dir: Path, read, suffixes, stack: ExitStack):
    """Yield read(<temp checkpoint holding a bounded group of layers>), so the reader never holds it all."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    handles = [stack.enter_context(safe_open(str(p), framework="pt")) for p in _shards(classic_dir)]
    mods = [(h, k.rsplit(".", 1)[0]) for h in handles for k in h.keys() if k.endswith(".qweight")]
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="quantkit-readback-")))
    for name in ("config.json", "quantize_config.json"):
        if (classic_dir / name).exists():
            shutil.copy2(classic_dir / name, tmp / name)
    chunk, size = {}, 0
    for i, (h, mod) in enumerate(mods):
        for s in suffixes:
            chunk[f"{mod}.{s}"] = h.get_tensor(f"{mod}.{s}")
        size += chunk[f"{mod}.qweight"].numel() * 8  # int32 words of <= 8 values
        if size >= CHUNK_PARAMS or i == len(mods) - 1:
            save_file(chunk, str(tmp / "model.safetensors"))
            yield read(tmp)
            chunk, size = {}, 0
