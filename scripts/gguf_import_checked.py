"""The demo model on a GPU host that cannot take its 540 MB fp32 checkpoint (the device tool carries 64 MiB a
call): the 98 MB source GGUF travels instead and is imported there by quantkit's own import (transformers' GGUF
loader, sources/gguf_import.py), and the result is proven to be the CPU host's import, tensor by tensor.

    python scripts/gguf_import_checked.py hashes MODEL_DIR > HASHES.json       # on the CPU host
    python scripts/gguf_import_checked.py import GGUF OUT_DIR --expect HASHES.json   # on the GPU host

`import` replaces the import's llama.cpp-vs-transformers perplexity check (gguf_verify.verify_import: it needs
llama.cpp's Python binding in-process, which segfaulted on the H200 in run 3) by something stronger for this
purpose: every tensor's SHA-256 equals the CPU import's, whose agreement with llama.cpp was checked there. A
mismatch is printed per tensor and the exit code is 3 (the import is kept: the caller decides).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path


def tensor_hashes(model_dir: Path) -> dict[str, str]:
    """name -> sha256 of the tensor's raw bytes (dtype and shape prefixed) over every safetensors file."""
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for name in st.keys():
                t = st.get_tensor(name).contiguous()
                h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
                out[name] = h.hexdigest()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hashes")
    h.add_argument("model_dir", type=Path)
    i = sub.add_parser("import")
    i.add_argument("gguf", type=Path)
    i.add_argument("out_dir", type=Path)
    i.add_argument("--expect", type=Path, required=True)
    a = ap.parse_args()
    if a.cmd == "hashes":
        print(json.dumps(tensor_hashes(a.model_dir), indent=1, sort_keys=True))
        return 0
    import quantkit.sources.gguf_verify as verify
    from quantkit.sources.gguf_import import import_gguf

    expect = json.loads(a.expect.read_text())
    t0 = time.perf_counter()
    # the checksum comparison below stands in for the in-process llama.cpp scoring (see the module docstring)
    verify.verify_import = lambda gguf_path, hf_dir: {"checked_by": "per-tensor sha256 against the CPU import",
                                                       "expected_file": a.expect.name}
    import_gguf(a.gguf, a.out_dir)
    import_s = time.perf_counter() - t0
    got = tensor_hashes(a.out_dir)
    differ = sorted(n for n in expect.keys() | got.keys() if expect.get(n) != got.get(n))
    rec = {"import_s": round(import_s, 1), "tensors": len(got), "expected_tensors": len(expect),
           "identical": not differ, "differing": differ[:20]}
    print(json.dumps(rec))
    return 3 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
