"""Weight quantization math and the int8 / fp8 matmul kernels behind `engine.quant`.

Every int8 kernel computes ``y = x @ (q * scale[:, None]).T`` for an int8 weight ``q: [N, K]`` with
per-output-channel scales ``scale: [N]``. Because the scale is per output channel it factors out of
the sum over K, so dequantization is a plain cast and the scale is applied to the output.

Kernels measured on this repo's CPU are in docs/quantization.md (benchmarks/int8_matmul_cpu.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
import torch.nn.functional as F

INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0
# Batch sizes (rows of x) up to this use `_weight_int8pack_mm`; larger ones a bf16 GEMM.
# Measured crossover on the AVX512-BF16 CPU (docs/quantization.md).
PACK_MAX_ROWS = 12

# (x2d [M, K], q [N, K] int8, scale [N] fp32, scale_lowp [N] bf16) -> y [M, N] in x's dtype
Int8Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w [N, K] -> (q [N, K] int8, scale [N] fp32)."""
    w32 = w.detach().float()
    amax = w32.abs().amax(dim=1)  # [N]
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))  # [N]
    q = torch.round(w32 / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [N, K] int8, scale [N] -> w [N, K] fp32."""
    return q.float() * scale[:, None]


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel e4m3: w [N, K] -> (q [N, K] float8_e4m3fn, scale [N] fp32)."""
    w32 = w.detach().float()
    amax = w32.abs().amax(dim=1)  # [N]
    scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))  # [N]
    q = (w32 / scale[:, None]).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def int8_dequant(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, scale_lowp: torch.Tensor
) -> torch.Tensor:
    """Cast the weight to x's dtype, GEMM, scale the output. Portable (any device, any dtype)."""
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)  # [M, N]


def int8_bf16(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, scale_lowp: torch.Tensor
) -> torch.Tensor:
    """Cast x and the weight to bf16 (int8 -> bf16 is exact), bf16 GEMM, fp32 output scale."""
    y = F.linear(x.to(torch.bfloat16), q.to(torch.bfloat16))  # [M, N] bf16
    return (y.float() * scale).to(x.dtype)


def int8_pack(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, scale_lowp: torch.Tensor
) -> torch.Tensor:
    """aten `_weight_int8pack_mm` with bf16 activations (its fp32 CPU path is ~10x slower)."""
    y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, scale_lowp)  # [M, N] bf16
    return y.to(x.dtype)


def int8_cpu_auto(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, scale_lowp: torch.Tensor
) -> torch.Tensor:
    """Small batches (decode GEMV) through `_weight_int8pack_mm`, larger ones through bf16 GEMM."""
    if x.shape[0] <= PACK_MAX_ROWS:
        return int8_pack(x, q, scale, scale_lowp)
    return int8_bf16(x, q, scale, scale_lowp)


def int8_w8a8(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, scale_lowp: torch.Tensor
) -> torch.Tensor:
    """NOT weight-only: x is quantized per token to int8 at run time, then int8 x int8 -> int32
    through `torch._int_mm` (VNNI on x86). Fastest here, but adds activation rounding error."""
    x32 = x.float()
    x_scale = (x32.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp_(min=1e-12)  # [M, 1]
    xq = torch.round(x32 / x_scale).to(torch.int8)  # [M, K]
    acc = torch._int_mm(xq, q.t())  # [M, N] int32
    return (acc.float() * x_scale * scale).to(x.dtype)


INT8_KERNELS: Mapping[str, Int8Kernel] = MappingProxyType(
    {
        "dequant": int8_dequant,
        "bf16": int8_bf16,
        "int8pack": int8_pack,
        "cpu_auto": int8_cpu_auto,
        "w8a8": int8_w8a8,
    }
)


BF16_SCALE_KERNELS = frozenset({"int8pack", "cpu_auto"})  # kernels that read `scale_lowp`


def default_int8_kernel(device: torch.device) -> str:
    """The kernel `auto` resolves to: measured fastest weight-only path for this device."""
    if device.type == "cpu" and torch.cpu._is_avx512_bf16_supported():
        return "cpu_auto"
    return "dequant"


def fp8_linear(x: torch.Tensor, q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (any float dtype), q [N, K] e4m3, w_scale [N] fp32 -> y [M, N] in x's dtype.

    Activations are quantized per token (row-wise scales) and fed with the weight's per-channel
    scales to `torch._scaled_mm`, which needs K and N divisible by 16 (checked by the caller).
    """
    x32 = x.float()
    x_scale = (x32.abs().amax(dim=1, keepdim=True) / FP8_E4M3_MAX).clamp_(min=1e-12)  # [M, 1]
    xq = (x32 / x_scale).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)  # [M, K]
    y = torch._scaled_mm(
        xq, q.t(), scale_a=x_scale, scale_b=w_scale[None, :], out_dtype=torch.bfloat16
    )  # [M, N]
    return y.to(x.dtype)
