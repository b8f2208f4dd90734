"""matmul_4bit: y = x @ dequantize(W).T + bias with autograd (gradients for x and bias only).

Forward saves only the packed weight and its QuantState (x is not needed for dx; W is frozen):
    y  = x W^T + b            x: (..., K), W: (N, K), y: (..., N)
    dx = dy W                 (..., N) @ (N, K) -> (..., K)
    db = sum over leading dims of dy
"""

from __future__ import annotations

import torch

from .. import dispatch
from ..nf4.state import QuantState

__all__ = ["MatMul4BitFunction", "matmul_4bit"]


class MatMul4BitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, state: QuantState, bias):
        ctx.state = state
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(packed)
        return dispatch.matmul(x, packed, state, bias)

    @staticmethod
    def backward(ctx, grad_y):
        (packed,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = dispatch.dequantize(packed, ctx.state, dtype=grad_y.dtype)  # (N, K), lives for this call only
            grad_x = grad_y @ w
        if ctx.needs_input_grad[3]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None):
    return MatMul4BitFunction.apply(x, packed, state, bias)
