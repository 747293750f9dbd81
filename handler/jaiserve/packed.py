"""``cpu_linear: onednn``: float32 Linear layers on CPU through oneDNN, weights packed once at load.

Why: ``nn.Linear`` calls MKL's sgemm, which re-reads the weight in its plain layout on every call. On
the AMD EPYC this project runs on, the 24,000-wide output head (37 MB of float32 weights) ran at
17.9 ms for 32 rows through MKL and 8.3 ms through oneDNN with the weight reordered once into its
blocked layout; a whole decode step of 32 requests went from 49.8 to 32.8 ms (docs/performance.md, Engine alone).
A second property comes with it: oneDNN computes each output row the same way whatever the number of
rows, so a request's logits are bit-for-bit the same alone and in any batch (MKL's are not: it picks
its blocking by the batch size). tests/test_packed.py checks both the values and the invariance.

Weights and biases are copied out of the ``nn.Linear``; the module keeps no float32 copy of the
plain weight, so packing costs no memory, and a packed model's ``state_dict()`` holds no Linear weights:
load with ``cpu_linear="aten"`` to save, fine-tune or export a model. ``torch.ops.mkldnn`` exists in PyTorch's x86 and arm64
CPU builds; where it does not, ``pack_linears`` leaves the model unchanged and says so.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from .model import GPT

logger = logging.getLogger(__name__)

CPU_LINEARS = ("onednn", "aten")  # handler.cpu_linear; aten = torch's own nn.Linear (MKL on x86)
BATCH_HINT = 64  # rows the packed layout is tuned for; any row count works (measured: 1..512)


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with W reordered once into oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float().contiguous()
        self.register_buffer("_packed", torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        y = torch.ops.mkldnn._linear_pointwise(rows, self._packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def pack_linears(model: GPT) -> GPT:
    """Replace every float32 CPU ``nn.Linear`` (the output head included) by a ``PackedLinear``.

    Other devices and dtypes are returned unchanged: CUDA has its own GEMMs, and bfloat16 on a CPU
    without native bf16 instructions is slower than float32 either way.
    """
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:
        return model
    if not onednn_available():
        logger.warning("cpu_linear onednn: this PyTorch build has no oneDNN; using torch's nn.Linear")
        return model
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, PackedLinear(child))
    return model


def linear_kernels(model: GPT) -> str:
    """What runs the model's Linear layers, for ``describe``: onednn, int8 or aten."""
    kind = type(model.head).__name__
    return {"PackedLinear": "onednn", "Int8Linear": "int8"}.get(kind, "aten")
