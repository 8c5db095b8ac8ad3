"""A lower-precision frozen backbone for client devices (``model.client_backbone``).

Only the frozen backbone changes; the neck and head that train and travel stay float32, and the
server never lowers anything. Each backbone layer's input is cast to the backbone's compute dtype
and its output back to float32 (forward hooks, so state-dict keys outside the backbone, the ones
that travel, are untouched).

- ``bf16``: the backbone's weights and activations in bfloat16 (half the weight memory; speed
  depends on the CPU's bf16 support: without AVX512-BF16/AMX it is slower than float32).
- ``int8``: weight-only int8. Every backbone ``Conv2d`` becomes ``Int8WeightConv2d``: symmetric int8
  weights with a float32 scale per output channel, dequantized for each forward. It stores a quarter
  of the conv weights' bytes; compute stays float32. Static int8 quantization
  (``torch.ao.quantization``, eager mode) is not used: it is deprecated in torch 2.x and has no
  quantized kernel for YOLO's SiLU, so every activation would need a dequantize around it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.model.detector import backbone_size

INT8_MAX = 127


class Int8WeightConv2d(nn.Module):
    """A frozen ``Conv2d`` whose weight is stored as int8 per output channel, used as float32."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        w = conv.weight.detach().float()
        scale = (w.abs().amax(dim=tuple(range(1, w.ndim))) / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        shape = (-1,) + (1,) * (w.ndim - 1)
        self.register_buffer("qweight", torch.round(w / scale.view(shape)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().float().clone())
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.view((-1,) + (1,) * (self.qweight.ndim - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _to_bf16(module: nn.Module, args: tuple) -> tuple:
    return _cast(args, torch.bfloat16)


def _to_fp32(module: nn.Module, args: tuple, output: Any) -> Any:
    return _cast(output, torch.float32)


def _int8_convs(layer: nn.Module) -> None:
    for name, child in list(layer.named_children()):
        if isinstance(child, nn.Conv2d):
            setattr(layer, name, Int8WeightConv2d(child))
        else:
            _int8_convs(child)


def lower_backbone(model: nn.Module, mode: str) -> nn.Module:
    """Lower the frozen backbone of ``model`` in place to ``fp32`` (unchanged), ``bf16`` or ``int8``."""
    if mode == "fp32":
        return model
    if mode not in ("bf16", "int8"):
        raise ValueError(f"unknown backbone precision {mode!r}; valid: fp32, bf16, int8")
    for layer in model.model[: backbone_size(model)]:
        for p in layer.parameters():
            p.requires_grad_(False)
        if mode == "int8":
            _int8_convs(layer)
        else:
            layer.to(torch.bfloat16)
            layer.register_forward_pre_hook(_to_bf16)
            layer.register_forward_hook(_to_fp32)
    return model


def backbone_bytes(model: nn.Module) -> int:
    """Bytes of the backbone's parameters and buffers (the part a client holds but never trains)."""
    layers = model.model[: backbone_size(model)]
    return sum(t.numel() * t.element_size() for layer in layers for t in (*layer.parameters(), *layer.buffers()))
