"""``dtype: int8``: int8 weights and per-row int8 activations, so a request's logits do not depend on
its batch-mates.

PyTorch's dynamic quantization (``torch.ao.quantization.quantize_dynamic``, the seed design doc's
proposal) picks one activation scale for the whole input of a Linear: a request decoded next to one
with larger activations is quantized more coarsely, and its greedy tokens can change with the batch.
Here each weight row (output channel) has its own scale, and each input row is divided by its own
largest magnitude before the int8 GEMM, so every input row is quantized on the same fixed grid and
scaled back afterwards. The integer GEMM sums exactly, so a row's output is bit-for-bit the same
alone and in any batch (tests/test_int8.py).

The GEMM is fbgemm's (x86 CPUs), called with the activation grid given rather than derived from the
input (``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``): every row, divided by its own
largest magnitude, lies in [-1, 1] and is quantized on that one grid, 7-bit as PyTorch's x86 default
(``reduce_range``: fbgemm's AVX2 kernels saturate at 8). It is the grid ``quantized::linear_dynamic``
picks for an input spanning exactly [-1, 1], which this module used to force with an extra constant row
(same outputs, bit for bit; the fixed grid saves that row's copy and fbgemm's min/max pass: the
model's 25 Linear layers in a row 1.15x faster for one request, 1.07x for 64). CPU only.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from .model import GPT
from .packed import PackedLinear, replace_linears

_TINY = torch.finfo(torch.float32).tiny  # an all-zero row keeps a finite scale
# the activation grid: [-1, 1] onto 0..127 (what linear_dynamic with reduce_range picks for [-1, 1])
_GRID_SCALE, _GRID_ZERO_POINT = 2 / 127, 64
_GEMM = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32  # float in, grid given, float out


class Int8Linear(nn.Module):
    """``y = x W^T + b``: W as int8 with one scale per output channel, x quantized row by row."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scales = weight.abs().amax(dim=1).clamp_min(_TINY) / 127  # symmetric: zero point 0
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are deprecated (for torchao); fbgemm's GEMM needs one
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(weight, scales.double(), zero_points, 0, torch.qint8)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)  # bias added in float32 below
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        # (M, 1): max |x| (vector_norm(inf) gives the same values, 25x slower for 64 rows here)
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(_TINY)
        y = _GEMM(rows / scale, _GRID_SCALE, _GRID_ZERO_POINT, self._packed)  # every row inside [-1, 1]
        y = y * scale if self.bias is None else torch.addcmul(self.bias, y, scale)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(model: GPT) -> GPT:
    """Replace every ``nn.Linear`` (the output head included) by an ``Int8Linear``; embeddings,
    LayerNorms, attention and the KV cache stay float32."""
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("dtype int8 runs on CPU only (fbgemm kernels); set handler.device: cpu")
    if any(isinstance(m, PackedLinear) for m in model.modules()):
        raise ValueError("int8 quantizes nn.Linear layers: load the model with cpu_linear='aten'")
    return replace_linears(model.float().eval(), Int8Linear)
