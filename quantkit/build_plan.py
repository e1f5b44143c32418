"""Build planner: per target, the peak host memory, peak GPU memory and wall time a build will need, before it
runs, and whether it fits the host (`quantkit plan RECIPE --gpu H200 --gpus N --host-ram 128GB`).

The work of each target is counted from the architecture (quantkit/data/architectures or the model's
config.json) and the calibration set; the constants that turn work into seconds and bytes are measured
(quantkit/data/build_costs.yaml says where). Per decoder layer, llm-compressor's sequential pipeline does
  forward   2 x layer params x tokens   (bf16, twice: calibrate, then propagate the quantized output)
  hessian   2 x tokens x sum(in_features^2) over the layer's linears   (GPTQ, accumulated in fp64)
  solve     2 x sum(in_features^2 x out_features)   (GPTQ, fp32)
  grid      n_grid x forward over the cached activations   (AWQ)
and holds on the GPU one layer's weights, its Hessians (GPTQ) and the activations of the cached inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from quantkit.errors import UserError
from quantkit.placement import HEADROOM

COSTS_FILE = Path(__file__).parent / "data" / "build_costs.yaml"
GB = 1e9


def costs() -> dict:
    return yaml.safe_load(COSTS_FILE.read_text())


@dataclass(frozen=True)
class Arch:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: dict) -> "Arch":
        cfg = cfg.get("text_config", cfg)
        h = cfg["hidden_size"]
        heads = cfg["num_attention_heads"]
        return cls(h, cfg["intermediate_size"], heads, cfg.get("num_key_value_heads", heads),
                   cfg.get("head_dim") or h // heads, cfg["num_hidden_layers"], cfg["vocab_size"],
                   bool(cfg.get("tie_word_embeddings", False)))

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of one decoder layer's linears: q, k, v, o, gate, up, down."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [(h, q), (h, kv), (h, kv), (q, h), (h, self.intermediate), (h, self.intermediate),
                (self.intermediate, h)]

    @property
    def layer_params(self) -> int:
        return sum(i * o for i, o in self.linears())

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden
        return self.layers * (self.layer_params + 2 * self.hidden) + embed * (1 if self.tied else 2) + self.hidden


def parse_bytes(text: str) -> float:
    """'128GB', '1.5TB', '64GiB', '500000000' -> bytes."""
    import re

    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", text, re.I)
    if not m:
        raise UserError(f"--host-ram {text!r}: expected a size such as 128GB or 1.5TB")
    scale = {"": 1, "K": 1, "M": 2, "G": 3, "T": 4}[m.group(2).upper()]
    return float(m.group(1)) * (1024 if m.group(3) else 1000) ** scale


@dataclass
class Need:
    target: str
    how: str  # model-free | layerwise | whole | convert | evaluate
    algorithm: str
    weights: str  # where the weights live during the work
    host_gb: float
    gpu_gb: float
    minutes: float
    fits: bool
    why: str = ""


def plan_build(arch: Arch, profiles: list[tuple[str, tuple[str, str] | None]], *, samples: int, seq_len: int,
               gpu: dict, gpus: int, host_ram: float, dtype_bytes: int = 2, offload: str = "auto",
               calib_procs: int = 1) -> list[Need]:
    """profiles: (target name, Format.build_profile) in build order; gpu: a row of gpus.yaml (with name);
    gpus: GPUs on the host (whole-model forwards spread over all); calib_procs: llm-compressor ranks."""
    c = costs()
    tokens = samples * seq_len
    weights = arch.params * dtype_bytes
    base = c["host_overhead_gb"] * GB
    gpu_cap = gpu["memory_gb"] * GB
    bf16, fp32 = gpu["bf16_tflops"] * 1e12, gpu["fp32_tflops"] * 1e12
    acts_cache = 2 * tokens * arch.hidden * dtype_bytes  # llm-compressor's intermediates, offloaded to host
    out = []
    for name, prof in profiles:
        if prof is None:
            out.append(Need(name, "?", "?", "?", 0, 0, 0, True, "this format gives the planner no profile"))
            continue
        how, alg = prof
        k = c["algorithms"].get(alg, c["algorithms"]["default"])
        if how == "model-free":
            shard = min(weights, c["shard_gb"] * GB)
            secs = weights / (c["model_free_gb_s"] * GB) + c["fixed_s"]
            n = Need(name, how, alg, "files (streamed)", (base + 2 * shard) / GB, 2.5 * shard / GB, secs / 60,
                     True)
        elif how == "layerwise":
            fwd = 2 * arch.layer_params * tokens * 2 / bf16
            hess = 2 * tokens * sum(i * i for i, _ in arch.linears()) / fp32 if k.get("hessian") else 0
            solve = 2 * sum(i * i * o for i, o in arch.linears()) / fp32 if k.get("hessian") else 0
            if k.get("grid_points"):
                per_layer = grid_search_seconds(arch, k, samples, seq_len, bf16, gpu["bandwidth_gb_s"] * GB)
            else:
                per_layer = k["time_factor"] * (fwd * k.get("forward_passes", 1) + hess + solve)
            # data-parallel calibration, weight-parallel GPTQ: llm-compressor's 8B runs scale ~0.5x per doubling
            per_layer /= calib_procs ** k.get("gpu_scaling", 0.9)
            secs = per_layer * arch.layers + c["fixed_s"] + weights / (c["load_gb_s"] * GB)
            # float64 Hessians per linear (quantkit/distributed.py gptq_hessians_in_float64: ranks reproduce one
            # process); the solve of the largest linear adds float32 copies: `hessian_copies` x 4 bytes (fitted
            # on run 6's float64 GPU peaks: 8B x 4 6.68 GB, 70B x 4 26.44 GB).
            sq = [i * i for i, _ in arch.linears()]
            hessians = (8 * sum(sq) + 4 * max(sq) * k.get("hessian_copies", 1)) if k.get("hessian") else 0
            layer_gpu = arch.layer_params * dtype_bytes + hessians
            # the first subgraph onloads the embedding, the last the lm_head with one sample's fp32 logits
            embed_gpu = arch.vocab * arch.hidden * dtype_bytes + 6 * seq_len * arch.vocab
            # per calibration sample held (AWQ caches the whole set): data-parallel ranks each hold their share
            acts = k["act_bytes_per_token_width"] * seq_len * (arch.hidden + arch.intermediate) / calib_procs
            gpu_need = max(layer_gpu, embed_gpu) + acts + c["cuda_context_gb"] * GB
            # ranks share one host copy of the weights (/dev/shm, quantkit/distributed.py); each adds its own
            # interpreter and its share of the cached activations, beside the parent's interpreter (run 6, 8B x 32
            # on 2 H200s: 22.4 GB RSS per rank, shared weights included; 24.6 GB for one process)
            host = weights + calib_procs * (base + acts_cache / calib_procs) + (base if calib_procs > 1 else 0)
            where = "host RAM" if calib_procs == 1 else f"host RAM, shared by {calib_procs} ranks"
            if offload == "disk" or (offload == "auto" and host * HEADROOM > host_ram):
                host = calib_procs * (base + acts_cache / calib_procs + arch.layer_params * dtype_bytes * 2) + \
                    (base if calib_procs > 1 else 0)
                where = "disk (offloaded)"
            n = Need(name, how, alg, where, host / GB, gpu_need / GB, secs / 60, True)
        elif how == "whole":
            fwd = 2 * arch.params * tokens / bf16
            secs = k["time_factor"] * fwd * k.get("forward_passes", 1) + c["fixed_s"] + weights / (c["load_gb_s"] * GB)
            # GGUF with an importance matrix: convert_hf_to_gguf.py writes the F16 GGUF and llama-quantize reads
            # it back, both streaming the weights on the CPU around llama-imatrix's forward
            secs += k.get("convert_passes", 0) * weights / (c["model_free_gb_s"] * GB)
            on_gpu = weights * HEADROOM <= gpu_cap * gpus
            # host_weights: the share of the weights the process holds on the host meanwhile (ModelOpt's export
            # gathers the quantized state dict there)
            host = base + k.get("host_weights", 0) * weights + (0 if on_gpu else weights - gpu_cap * gpus * 0.9)
            one = weights * HEADROOM <= gpu_cap  # placement.whole_model_device_map: one GPU when it fits
            gpu_need = min(weights * HEADROOM / (1 if one else gpus), gpu_cap) / GB  # per GPU
            where = ("GPU" if one else f"{gpus} GPUs (device_map=auto)") if on_gpu else \
                "GPU + host RAM (device_map=auto)"
            n = Need(name, how, alg, where, host / GB, gpu_need, secs / 60, True)
        else:  # convert: llama.cpp reads the safetensors and writes the GGUF, streaming
            secs = 2 * weights / (c["model_free_gb_s"] * GB) + c["fixed_s"]
            n = Need(name, how, alg, "files (streamed)", (base + c["shard_gb"] * GB) / GB, 0, secs / 60, True)
        if n.host_gb * GB > host_ram:
            n.fits, n.why = False, f"needs {n.host_gb:.0f} GB of host RAM, {host_ram / GB:.0f} GB given"
        elif n.gpu_gb * GB > gpu_cap:
            n.fits, n.why = False, f"needs {n.gpu_gb:.0f} GB on one GPU, {gpu['name']} has {gpu['memory_gb']} GB"
        out.append(n)
    return out


def grid_search_seconds(arch: Arch, k: dict, samples: int, seq_len: int, bf16: float, bandwidth: float) -> float:
    """One decoder layer of AWQ (llm-compressor 0.14). For each of `grid_points` scale ratios it re-runs the
    parent of every smoothing mapping over the whole calibration set: self_attn (q, k, v, o and the attention
    itself), the mlp, down_proj. The attention's time is its softmax scores' memory traffic (samples x heads x
    seq^2 elements), not its FLOPs: it is why the grid costs 2.4 x more at 70B width than at 8B, not 3.9 x as
    the layer's parameters. Then the calibrate and propagate passes, which at these sizes are mostly a fixed
    cost per sample. Constants fitted per mapping on the 8B H200 log (scripts/fit_build_costs.py)."""
    tokens = samples * seq_len
    lin = arch.linears()
    attn, mlp, down = sum(i * o for i, o in lin[:4]), sum(i * o for i, o in lin[4:]), lin[6][0] * lin[6][1]
    attn_core = 4 * tokens * seq_len * arch.heads * arch.head_dim  # QK^T and AV
    scores = samples * arch.heads * seq_len ** 2 * k["score_bytes"] / bandwidth
    point = k["time_factor"] * (2 * tokens * (attn + mlp + down) + attn_core) / bf16 + scores
    one_pass = k["time_factor"] * (2 * tokens * arch.layer_params + attn_core) / bf16 + scores
    return (k["grid_points"] * point * (1 + k["grid_overhead"]) + k.get("forward_passes", 2) * one_pass
            + samples * k["sample_s"])


def plan_recipe(loaded, config: dict, gpu_name: str, gpus: int, host_ram: float) -> list[Need]:
    """The build plan of a recipe's targets (baseline evaluation first) on `gpus` x `gpu_name`."""
    from quantkit.formats import get_format
    from quantkit.planner import gpu_table

    spec = loaded.recipe.model
    gpu = {**gpu_table()[gpu_name], "name": gpu_name}
    n = spec.gpus if isinstance(spec.gpus, int) else gpus
    if n > gpus:
        raise UserError(f"model.gpus: {n} asked for, the plan has {gpus}", fix=f"plan with --gpus {n}")
    profiles: list[tuple[str, tuple[str, str] | None]] = []
    if loaded.recipe.baseline and loaded.recipe.eval.perplexity:
        profiles.append(("baseline (evaluate)", ("whole", "evaluate")))
    for t in loaded.targets:
        fmt = get_format(t.format)
        for v in fmt.variants(t):
            profiles.append((v.name, fmt.build_profile(v)))
    c = loaded.recipe.calibration
    dtype_bytes = 4 if spec.dtype == "float32" else 2
    return plan_build(Arch.from_config(config), profiles, samples=c.num_samples, seq_len=c.seq_len, gpu=gpu,
                      gpus=gpus, host_ram=host_ram, dtype_bytes=dtype_bytes, offload=spec.offload, calib_procs=n)


def table(needs: list[Need], title: str):
    from rich.table import Table

    t = Table(title=title)
    for col in ("target", "how", "algorithm", "weights during build", "host GB", "GPU GB", "minutes", "fits"):
        t.add_column(col, justify="right" if col.endswith(("GB", "minutes")) else "left")
    for n in needs:
        t.add_row(n.target, n.how, n.algorithm, n.weights, f"{n.host_gb:.1f}", f"{n.gpu_gb:.1f}",
                  f"{n.minutes:.1f}", "fits" if n.fits else f"does not fit: {n.why}")
    return t


def refuse_unfit(needs: list[Need]) -> None:
    bad = [n for n in needs if not n.fits]
    if bad:
        more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"target {bad[0].target} cannot be built here: {bad[0].why}{more}",
                        fix="add GPUs (--gpus), host RAM, or model.offload: disk")
