"""Kernel-backed linear modules, one per weight kind, each with a reference path (dequantized matmul) that runs
anywhere and computes the same function; the kernels come from maintained libraries:

- fp8: `torch._scaled_mm` (cuBLASLt, fast accumulation). Per-tensor scales go into the GEMM; per-row scales
  either into the GEMM (`rowwise`: scale_a (M, 1), scale_b (1, N)) or, since torch's rowwise kernel is slow at
  decode sizes on sm90 (research/gpu-engines.md), as a unit-scale GEMM followed by a multiply that
  `torch.compile` fuses (`epilogue`). Activations are quantized here (per tensor static, or per token).
- int8: gemlite `A8W8_int8_dynamic` (Triton; per-token activation quantization inside gemlite).
- int4: gemlite `A16W4_HQQ_INT` (any group size, zero points; "gemlite-<TYPE>" pins one of its kernels, e.g.
  GEMV_SPLITK, instead of its own pick by rows), torch's tinygemm `_weight_int4pack_mm` (groups 32..256, zero
  point folded into a float offset; "tinygemm-k4"/"-k2": 4 or 2 inner K tiles instead of 8), or "inductor" /
  "inductor-i32": the dequantize-multiply-sum written out for torch.compile to fuse into one reduction kernel
  over the packed nibbles, 2 per byte or 8 per int32 word (decode only; on the H200 0.62-0.77 TB/s against
  tinygemm's 1.69: kept as a measured option, docs/benchmarks/h200/ run 4). `Int4Linear.kernel` says which.
- dense: `torch.nn.Linear`.
Activation quantization formulas are shared by the kernel and reference paths, so their difference is only
the GEMM's arithmetic.
"""
from __future__ import annotations

import torch
from torch import nn

from quantkit.evaluation.kernels.weights import QuantWeight

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def token_scale(x: torch.Tensor, qmax: float) -> torch.Tensor:
    """Per-token (row) scale amax/qmax in fp32, as compressed-tensors and gemlite compute it."""
    return (x.abs().amax(-1, keepdim=True).float() / qmax).clamp(min=1e-6)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


class Fp8Linear(nn.Module):
    def __init__(self, qw: QuantWeight, device, dtype, reference: bool, rowwise: str = "epilogue"):
        super().__init__()
        self.weight = nn.Parameter(qw.weight.to(device), requires_grad=False)
        self.register_buffer("w_scale", qw.weight_scale.float().to(device))
        self.register_buffer("in_scale", None if qw.input_scale is None else qw.input_scale.float().to(device))
        self.register_buffer("bias", None if qw.bias is None else qw.bias.to(device, dtype))
        self.register_buffer("one", torch.ones((), device=device))
        self.dtype, self.reference, self.rowwise = dtype, reference, rowwise
        self.kernel = "reference" if reference else ("scaled_mm-tensor" if self._per_tensor() else f"scaled_mm-{rowwise}")

    def _per_tensor(self) -> bool:
        return self.w_scale.dim() == 0 and self.in_scale is not None

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        sx = self.in_scale if self.in_scale is not None else token_scale(x, FP8_MAX)
        xq = quantize_fp8(x, sx)
        ws = self.w_scale if self.w_scale.dim() == 0 else self.w_scale.view(1, -1)
        if self.reference:
            y = ((xq.float() * sx) @ self.weight.float().t()) * ws
        elif self._per_tensor():
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=sx, scale_b=ws, out_dtype=self.dtype,
                                 use_fast_accum=True)
        elif self.rowwise == "rowwise":
            m, n = x.shape[0], self.weight.shape[0]
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=sx.expand(m, 1).contiguous(),
                                 scale_b=ws.expand(1, n).contiguous(), out_dtype=self.dtype, use_fast_accum=True)
        else:  # unit-scale GEMM, scales applied by a (compile-fused) multiply on its output
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=self.one, scale_b=self.one, out_dtype=self.dtype,
                                 use_fast_accum=True) * (sx * ws)
        if self.bias is not None:
            y = y + self.bias
        return y.to(self.dtype).view(*shape[:-1], -1)


class Int8Linear(nn.Module):
    def __init__(self, qw: QuantWeight, device, dtype, reference: bool):
        super().__init__()
        self.dtype, self.reference = dtype, reference
        self.kernel = "reference" if reference else "gemlite-A8W8_int8_dynamic"
        if reference:
            self.register_buffer("weight", qw.weight.to(device))
            self.register_buffer("w_scale", qw.weight_scale.float().view(-1, 1).to(device))
            self.register_buffer("bias", None if qw.bias is None else qw.bias.to(device, dtype))
        else:
            from gemlite.helper import A8W8_int8_dynamic

            self.gemlite = A8W8_int8_dynamic(device=device, dtype=dtype).from_weights(
                qw.weight.to(device), scales=qw.weight_scale.float().view(-1, 1).to(device),
                bias=None if qw.bias is None else qw.bias.to(device, dtype))

    def forward(self, x):
        if not self.reference:
            return self.gemlite(x)
        sx = token_scale(x, 127.0)
        xq = (x.float() / sx).clamp(-128, 127).round()
        y = (xq * sx) @ (self.weight.float() * self.w_scale).t()
        if self.bias is not None:
            y = y + self.bias
        return y.to(self.dtype)


def tinygemm_scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor, dtype) -> torch.Tensor:
    """tinygemm dequantizes w = (q - 8) * s + offset: for W = (q - z) * s the offset is (8 - z) * s.
    Layout (ngroups, N, 2)."""
    s = scale.to(torch.float32)
    return torch.stack([s, (8.0 - zero.float()) * s], dim=-1).transpose(0, 1).contiguous().to(dtype)


def tinygemm_serves(in_features: int, group_size: int, k_tiles: int = 8) -> bool:
    """torch's tinygemm packs the input dimension in tiles of k_tiles x 16 (innerKTiles, 8 by default) and
    takes groups of 32..256; other shapes go to the next kernel of the module's choice."""
    return in_features % (16 * k_tiles) == 0 and group_size in (32, 64, 128, 256)


def tinygemm_tiles(kernel: str) -> int:
    """"tinygemm" -> 8 inner K tiles, "tinygemm-k4" -> 4."""
    return int(kernel.removeprefix("tinygemm-k")) if kernel.startswith("tinygemm-k") else 8


class Int4Linear(nn.Module):
    """`kernel` is one kernel name, or {tokens: kernel} (choices.BY_TOKENS): the module then holds each kernel's
    copy of the weight and picks per call by the number of tokens (the entry at the size nearest below), so
    decode steps and prefill of one model run different kernels. Under torch.compile the pick is made at trace
    time (shapes are static). Kernels: "gemlite", "tinygemm", "dequant" (the weight dequantized to bf16 inside
    the compiled graph, then cuBLAS: for prefill, where the GEMM is compute-bound and the 4-bit kernels are
    slower than cuBLAS), "reference" (fp32, any device)."""

    def __init__(self, qw: QuantWeight, device, dtype, kernel):
        super().__init__()
        self.dtype, self.group_size = dtype, qw.group_size
        self.by_tokens = {int(t): k for t, k in kernel.items()} if isinstance(kernel, dict) else {1: kernel}
        self.kernel = "/".join(f"{k}@{t}" for t, k in sorted(self.by_tokens.items())) if len(self.by_tokens) > 1 \
            else self.by_tokens[1]
        self.out_features = qw.q.shape[0]
        self.register_buffer("perm", None if qw.perm is None else qw.perm.to(device))
        pqs = qw.pre_quant_scale
        self.register_buffer("pre_quant_scale", None if pqs is None else pqs.to(device, dtype))
        self.register_buffer("bias", None if qw.bias is None else qw.bias.to(device, dtype))
        q = qw.q.to(device)
        tiny = {k for k in self.by_tokens.values() if k.startswith("tinygemm")}
        if any(not tinygemm_serves(q.shape[1], qw.group_size, tinygemm_tiles(k)) for k in tiny):
            # e.g. SmolLM2's hidden size 576: tinygemm packs K in tiles of 128 (measured on the H200 demo run)
            sub = "gemlite" if str(device).startswith("cuda") else "reference"
            self.by_tokens = {t: sub if k in tiny else k for t, k in self.by_tokens.items()}
            self.kernel = "/".join(f"{k}@{t}" for t, k in sorted(self.by_tokens.items())) \
                if len(self.by_tokens) > 1 else self.by_tokens[1]
        kernels = set(self.by_tokens.values())
        known = {"reference", "gemlite", "dequant", "inductor", "inductor-i32"}
        if unknown := {k for k in kernels - known if not k.startswith(("tinygemm", "gemlite-"))}:
            raise ValueError(f"unknown int4 kernel {sorted(unknown)}")
        if kernels & {"reference", "dequant"}:
            self.register_buffer("q", q)
            fdt = torch.float32 if "reference" in kernels else dtype
            self.register_buffer("scale", qw.scale.to(device, fdt))
            self.register_buffer("zero", qw.zero.to(device, fdt))
        if "inductor" in kernels:  # two nibbles per byte along K (low = even k)
            self.register_buffer("nibbles", (q[:, 1::2] << 4 | q[:, ::2]).to(torch.uint8))
        if "inductor-i32" in kernels:  # eight per int32 word along K, nibble j = k % 8 at bits 4j
            shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
            words = (q.view(q.shape[0], -1, 8).to(torch.int64) << shifts).sum(-1)
            self.register_buffer("words", (words - (words >= 2**31).long() * 2**32).to(torch.int32))
        if kernels & {"inductor", "inductor-i32"}:  # the groups' scale and zero point
            self.register_buffer("g_scale", qw.scale.to(device, dtype))
            self.register_buffer("g_zero", qw.zero.to(device, dtype))
        if any(k.startswith("gemlite") for k in kernels):
            from gemlite.helper import A16W4_HQQ_INT

            self.gemlite = A16W4_HQQ_INT(device=device, dtype=dtype).from_weights(
                q, qw.scale.to(device, dtype), qw.zero.to(device, dtype))
        for k in tiny & kernels:  # one packed copy per tile count asked for
            tiles = tinygemm_tiles(k)
            if str(device).startswith("cuda"):
                packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
                self.register_buffer(f"packed{tiles}", torch.ops.aten._convert_weight_to_int4pack(packed, tiles))
            else:  # torch's CPU build of the same kernel (used by the tests to check the conversion)
                self.register_buffer(f"packed{tiles}", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), tiles))
        if tiny & kernels:
            self.register_buffer("sz", tinygemm_scales_and_zeros(qw.scale, qw.zero, dtype).to(device))

    def pick(self, tokens: int) -> str:
        """The kernel measured at the size nearest below `tokens` (a plain loop: torch.compile traces it)."""
        sizes = sorted(self.by_tokens)
        kernel = self.by_tokens[sizes[0]]
        for t in sizes:
            if t <= tokens:
                kernel = self.by_tokens[t]
        return kernel

    def _fused_dequant(self, x, words: bool):
        """y = x W^T with W = (q - z) s, written as one multiply-sum that inductor compiles into a single
        reduction over the packed weight (as gpt-fast's int8 weight-only relies on): each byte (word) is read
        once and its nibbles meet the inputs they multiply. For a few rows only (no tensor cores)."""
        n, ng = self.g_scale.shape
        z, s = self.g_zero.float().unsqueeze(-1), self.g_scale.float().unsqueeze(-1)
        per = 8 if words else 2
        packed = (self.words if words else self.nibbles).view(n, ng, -1)     # (n, groups, g / per)
        xs = x.float().view(x.shape[0], 1, ng, -1, per).unbind(-1)           # per x (m, 1, groups, g / per)
        acc = sum(xs[j] * (((packed >> (4 * j)) & 15).float() - z) for j in range(per))
        return (acc * s).sum((-1, -2))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        if self.perm is not None:
            x = x[:, self.perm]
        kernel = self.pick(x.shape[0])
        if kernel == "gemlite":
            y = self.gemlite(x)
        elif kernel.startswith("gemlite-"):
            y = self.gemlite.forward_manual(x, kernel.removeprefix("gemlite-"))
        elif kernel.startswith("tinygemm"):
            mm = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
            y = mm(x.to(self.dtype), getattr(self, f"packed{tinygemm_tiles(kernel)}"), self.group_size, self.sz)
        elif kernel.startswith("inductor"):
            y = self._fused_dequant(x, words=kernel == "inductor-i32")
        elif kernel == "dequant":
            gs = self.group_size
            w = (self.q.to(self.dtype) - self.zero.repeat_interleave(gs, 1)) * self.scale.repeat_interleave(gs, 1)
            y = x.to(self.dtype) @ w.t()
        else:
            g = torch.arange(self.q.shape[1], device=x.device) // self.group_size
            w = (self.q.float() - self.zero[:, g].float()) * self.scale[:, g].float()
            y = x.float() @ w.t()
        if self.bias is not None:
            y = y + self.bias
        return y.to(self.dtype).view(*shape[:-1], self.out_features)


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None, device, dtype) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.to(device, dtype), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(device, dtype), requires_grad=False)
    lin.kernel = "reference" if str(device) == "cpu" else "cublas-bf16"
    return lin


def make_linear(qw: QuantWeight, device, dtype, kernels: dict) -> nn.Module:
    """The module for one linear; `kernels` maps kind -> kernel name ("reference" = dequantized matmul), or for
    int4 optionally {tokens: kernel name} (picked per call)."""
    k = kernels.get(qw.kind, "reference")
    if qw.kind == "dense":
        return dense_linear(qw.weight, qw.bias, device, dtype)
    if qw.kind == "fp8":
        return Fp8Linear(qw, device, dtype, reference=k == "reference", rowwise=k.removeprefix("scaled_mm-"))
    if qw.kind == "int8":
        return Int8Linear(qw, device, dtype, reference=k == "reference")
    return Int4Linear(qw, device, dtype, kernel=k)
