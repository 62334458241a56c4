"""Weight quantization for the decode pool: a pass that swaps the decoder layers' `nn.Linear`s.

    model = quantize(build_model(...), QuantConfig("int8"))          # whole built model, or
    hook = quantize_layer_fn(QuantConfig("int8"))                     # per layer while loading:
    hook(layer)                                                       # peak = quantized + one layer

- `int8`: weight-only, symmetric per-output-channel int8 (`Int8Linear`), any device. The matmul
  kernel is picked at construction from the device (see `quant_kernels.default_int8_kernel`);
  `QuantConfig.int8_kernel` or the env var `PDSERVE_INT8_KERNEL` overrides it.
- `fp8`: e4m3 weights with per-channel scales, activations quantized per token at run time,
  `torch._scaled_mm` (`Fp8Linear`); NVIDIA GPUs with compute capability >= 8.9 only.

Only modules whose type is exactly `nn.Linear` inside the `layers` ModuleList are swapped;
embeddings, norms and `lm_head` keep full precision, and biases stay in full precision.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from engine.quant_kernels import (
    BF16_SCALE_KERNELS,
    INT8_KERNELS,
    default_int8_kernel,
    fp8_linear,
    quantize_fp8,
    quantize_int8,
)

QuantMethod = Literal["none", "int8", "fp8"]
METHODS: tuple[str, ...] = ("none", "int8", "fp8")
KERNEL_ENV = "PDSERVE_INT8_KERNEL"


@dataclass(frozen=True, slots=True)
class QuantConfig:
    method: QuantMethod = "none"
    # auto | dequant | bf16 | int8pack | cpu_auto | w8a8 (w8a8 also quantizes activations)
    int8_kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"quantization method {self.method!r} is not one of {METHODS}")
        _check_kernel_name(self.int8_kernel)


def _check_kernel_name(name: str) -> None:
    if name != "auto" and name not in INT8_KERNELS:
        raise ValueError(f"int8 kernel {name!r} is not 'auto' or one of {sorted(INT8_KERNELS)}")


def resolve_int8_kernel(requested: str, device: torch.device) -> str:
    """Config (when not 'auto') wins, then $PDSERVE_INT8_KERNEL, then the device default."""
    if requested == "auto":
        requested = os.environ.get(KERNEL_ENV, "auto") or "auto"
        _check_kernel_name(requested)
    return default_int8_kernel(device) if requested == "auto" else requested


def check_supported(method: str, device: torch.device | str) -> None:
    """Raise ValueError saying why `method` cannot run on `device`; return if it can."""
    device = torch.device(device)
    if method not in METHODS:
        raise ValueError(f"quantization method {method!r} is not one of {METHODS}")
    if method != "fp8":
        return
    need = (
        "fp8 quantization needs an NVIDIA GPU with compute capability >= 8.9 (Ada Lovelace or "
        "Hopper, e.g. L4/L40/H100/H200), whose fp8 tensor cores torch._scaled_mm uses"
    )
    if device.type != "cuda":
        raise ValueError(f"{need}; device {str(device)!r} is not a CUDA GPU. Use 'int8' here.")
    if not torch.cuda.is_available():
        raise ValueError(f"{need}; this torch build or machine has no CUDA. Use 'int8' here.")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ValueError(
            f"{need}; {name} has compute capability {major}.{minor}. Use 'int8' on this GPU."
        )


class Int8Linear(nn.Module):
    """y = x @ (weight * scale[:, None]).T + bias; weight int8 [out, in], scale fp32 [out]."""

    weight: torch.Tensor
    scale: torch.Tensor
    scale_lowp: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, kernel: str
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # [N, K] int8
        self.register_buffer("scale", scale)  # [N] fp32
        self.register_buffer("bias", bias)  # [N] full precision, or None
        self.kernel = resolve_int8_kernel(kernel, weight.device)
        self._matmul = INT8_KERNELS[self.kernel]
        # bf16 copy of the scales for `_weight_int8pack_mm` (2 bytes per channel), else empty
        lowp = scale.to(torch.bfloat16) if self.kernel in BF16_SCALE_KERNELS else scale[:0]
        self.register_buffer("scale_lowp", lowp, persistent=False)  # [N] or [0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str = "auto") -> Int8Linear:
        q, scale = quantize_int8(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q, scale, bias, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> y: [..., N]
        x2d = x.reshape(-1, self.in_features)  # [M, K]
        y = self._matmul(x2d, self.weight, self.scale, self.scale_lowp)  # [M, N]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}"


class Fp8Linear(nn.Module):
    """e4m3 weight [out, in] with fp32 per-channel scale [out]; per-token fp8 activations.

    The constructor takes already-quantized tensors; `from_linear` checks the device first.
    Layers whose sizes `_scaled_mm` cannot take (not multiples of 16) dequantize to x's dtype.
    """

    weight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # [N, K] float8_e4m3fn
        self.register_buffer("scale", scale)  # [N] fp32
        self.register_buffer("bias", bias)
        self.use_scaled_mm = self.in_features % 16 == 0 and self.out_features % 16 == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        check_supported("fp8", linear.weight.device)
        q, scale = quantize_fp8(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> y: [..., N]
        x2d = x.reshape(-1, self.in_features)  # [M, K]
        if self.use_scaled_mm:
            y = fp8_linear(x2d, self.weight, self.scale)  # [M, N]
        else:
            y = F.linear(x2d, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scaled_mm={self.use_scaled_mm}"


def _quantize_linear(linear: nn.Linear, cfg: QuantConfig) -> nn.Module:
    if cfg.method == "int8":
        return Int8Linear.from_linear(linear, cfg.int8_kernel)
    return Fp8Linear.from_linear(linear)


def quantize_layer(layer: nn.Module, cfg: QuantConfig) -> None:
    """Swap, in place, every module of type exactly `nn.Linear` under `layer` (one decoder layer)."""
    if cfg.method == "none":
        return
    for name, child in list(layer.named_children()):
        if type(child) is nn.Linear:
            setattr(layer, name, _quantize_linear(child, cfg))
        else:
            quantize_layer(child, cfg)


def quantize_layer_fn(cfg: QuantConfig) -> Callable[[nn.Module], None]:
    """The loader's per-layer hook: call it on each decoder layer right after its weights load."""
    return partial(quantize_layer, cfg=cfg)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Every element of each `nn.ModuleList` named `layers` in `model`."""
    found = [
        layer
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers"
        for layer in module
    ]
    if not found:
        raise ValueError("quantize: no decoder layers (an nn.ModuleList named 'layers') in model")
    return found


def quantize(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """Quantize every decoder layer's linears in place; returns `model` for chaining."""
    if cfg.method == "none":
        return model
    for layer in decoder_layers(model):
        quantize_layer(layer, cfg)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and persistent buffers (shared tensors counted once)."""
    seen: set[tuple[int, int, torch.dtype]] = set()
    total = 0
    for tensor in model.state_dict(keep_vars=True).values():
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total
