"""llm-compressor's `oneshot` called directly, as its examples do, on the same model, modifiers and calibration
tokens as a quantkit target: the reference for quantkit's overhead (quantkit produce / direct <= 1.05).

    python scripts/direct_oneshot.py MODEL_DIR CALIB.safetensors OUT_DIR gptq|awq [--group 128] [--hessians float32]

GPTQ: quantkit accumulates its Hessians in float64 (quantkit/distributed.py: N ranks then reproduce one process
bit for bit), which llm-compressor does in float32; `--hessians float64` (the default) applies the same change
here so both sides do the same work, `--hessians float32` times stock llm-compressor (run 6 measured that one:
quantkit / stock 1.09 on the produce span at 8B x 4, the float64 accumulation included).

Times the same span quantkit's `produce` covers (from_pretrained .. save_pretrained) and prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def modifiers(kind: str, group: int) -> list:
    """The modifiers quantkit's gptq / awq formats build for their defaults (W4, group `group`, lm_head kept)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    sym = kind == "gptq"
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=sym, strategy="group", group_size=group))
    if kind == "gptq":
        return [GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], dampening_frac=0.01,
                             actorder="weight")]
    return [AWQModifier(duo_scaling=True, n_grid=20),
            QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("calib")
    ap.add_argument("out")
    ap.add_argument("kind", choices=["gptq", "awq"])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--hessians", choices=["float64", "float32"], default="float64")
    a = ap.parse_args()
    if a.kind == "gptq" and a.hessians == "float64":
        from quantkit.distributed import gptq_hessians_in_float64

        gptq_hessians_in_float64()
    import datasets
    import torch
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_file(a.calib)["input_ids"]
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    tok = AutoTokenizer.from_pretrained(a.model)
    mods = modifiers(a.kind, a.group)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype="auto")
    oneshot(model=model, recipe=mods, tokenizer=tok, dataset=ds, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    model.save_pretrained(a.out, save_compressed=True)
    wall = time.perf_counter() - t0
    hwm = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    rec = {"direct": a.kind, "hessians": a.hessians if a.kind == "gptq" else None, "produce_s": round(wall, 2), "samples": ids.shape[0], "seq_len": ids.shape[1],
           "vmhwm": hwm}
    if torch.cuda.is_available():
        rec["gpu_peak_allocated"] = torch.cuda.max_memory_allocated()
    print(json.dumps(rec), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
