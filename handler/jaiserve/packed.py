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

``dtype: bfloat16`` on CPU (``bfloat16_linears``): the same layers with bfloat16 weights, each input
rounded to bfloat16 on its way in and the product, plus the float32 bias, back in float32; embeddings,
LayerNorms, attention, the residual stream and the KV cache stay float32. Half the bytes to read per
token, and on CPUs with bfloat16 instructions (AVX512-BF16, AMX) oneDNN's bfloat16 GEMMs: the model's
25 Linear layers in a row, 2-vCPU Intel Xeon with AMX, 2 threads, 1.5 / 1.6 / 1.8 / 2.8 ms for 1 / 4 /
16 / 64 rows against 2.4 / 2.4 / 4.5 / 11.2 ms in float32. Where oneDNN has no bfloat16 kernel for the
CPU, the weights stay bfloat16 and torch's own bfloat16 GEMM runs them (slower than float32 there).
Two costs: every product comes back rounded to bfloat16 (8 significant bits; the logits too, so they
tie often: sampling.py keeps every tie at k, as the seed does), and, unlike float32 and int8, a row's
result can depend on how many rows share the step (oneDNN picks another kernel by row count: on the
Xeon above, 6 to 36 rows of the 1536-wide MLP input), so a request's tokens can change with its
batch-mates.
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
    """``y = x W^T + b`` with W reordered once into oneDNN's blocked layout (float32 or bfloat16 W)."""

    def __init__(self, linear: nn.Linear, weight_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_dtype = weight_dtype
        weight = linear.weight.detach().to(weight_dtype).contiguous()
        self.register_buffer("_packed", torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self.register_buffer("bias", bias, persistent=False)
        self.post_op = ("none", [], "")  # what oneDNN applies to the output: see fuse_gelu

    def fuse_gelu(self) -> None:
        """Apply the exact (erf) GELU to the output inside oneDNN's product, float32 only: a decode step
        then makes one operator call less per block. It computes what ``nn.GELU()`` after the layer does
        (tests/test_packed.py)."""
        assert self.weight_dtype == torch.float32, "a bfloat16 product gets its float32 bias after oneDNN"
        self.post_op = ("gelu", [], "none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:  # (B, T, C) sequences; decode steps pass (B, C) rows as they are
            return self.forward(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        if self.weight_dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self._packed, self.bias, *self.post_op)
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.weight_dtype).contiguous(), self._packed, None, *self.post_op)
        return _float32_plus_bias(y, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight_dtype={self.weight_dtype}")


class Bfloat16Linear(nn.Module):
    """``y = x W^T + b`` with a bfloat16 W through torch's own GEMM: the bfloat16 Linear where oneDNN has
    no bfloat16 kernel for this CPU, or with ``cpu_linear: aten``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16).contiguous(), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _float32_plus_bias(nn.functional.linear(x.to(torch.bfloat16), self.weight), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _float32_plus_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A bfloat16 product back in float32, the float32 bias added (one operator: add promotes)."""
    return y.float() if bias is None else torch.add(bias, y)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def pack_linears(model: GPT) -> GPT:
    """Replace every float32 CPU ``nn.Linear`` (the output head included) by a ``PackedLinear``.

    Other devices and dtypes are returned unchanged: CUDA has its own GEMMs, and a whole bfloat16 model
    on CPU is what ``bfloat16_linears`` replaces.
    """
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:
        return model
    if not onednn_available():
        logger.warning("cpu_linear onednn: this PyTorch build has no oneDNN; using torch's nn.Linear")
        return model
    replace_linears(model, PackedLinear)
    for block in model.blocks:
        block.mlp.c_fc.fuse_gelu()
        block.mlp.gelu = nn.Identity()
    return model


def bfloat16_available() -> bool:
    """Whether oneDNN has bfloat16 kernels for this CPU (AVX512-BF16 or AMX; AVX512 emulation counts)."""
    return onednn_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def bfloat16_linears(model: GPT, cpu_linear: str = "onednn") -> GPT:
    """Every Linear layer of a float32 CPU model with bfloat16 weights (``dtype: bfloat16`` on CPU): packed
    for oneDNN when ``cpu_linear`` is onednn and oneDNN has bfloat16 kernels here, else torch's GEMM."""
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:
        raise ValueError(f"bfloat16_linears needs a float32 CPU model, got {param.dtype} on {param.device.type}")
    if cpu_linear == "onednn" and bfloat16_available():
        return replace_linears(model, lambda linear: PackedLinear(linear, torch.bfloat16))
    if cpu_linear == "onednn":
        logger.warning("dtype bfloat16: oneDNN has no bfloat16 kernels for this CPU; using torch's bfloat16 GEMM")
    return replace_linears(model, Bfloat16Linear)


def replace_linears(model: GPT, make) -> GPT:
    """Every ``nn.Linear`` of ``model``, the output head included, replaced by ``make(linear)``."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, make(child))
    return model


def linear_kernels(model: GPT) -> str:
    """What runs the model's Linear layers, for ``describe``: onednn, onednn-bfloat16, aten-bfloat16, int8
    or aten."""
    head = model.head
    if isinstance(head, PackedLinear):
        return "onednn" if head.weight_dtype == torch.float32 else "onednn-bfloat16"
    return {"Bfloat16Linear": "aten-bfloat16", "Int8Linear": "int8"}.get(type(head).__name__, "aten")
