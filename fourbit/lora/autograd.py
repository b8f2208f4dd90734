"""matmul_4bit: y = x @ dequantize(W).T + bias with autograd (gradients for x and bias only).

The gradients, for x: (..., K), the frozen W: (N, K), y: (..., N):
    y  = x W^T + b
    dx = dy W                  (..., N) @ (N, K) -> (..., K)   needs W only, not x
    db = sum of dy over all leading dims                  (N,)
    dW is never formed: W is frozen (QLoRA trains adapters beside it).
So the forward saves the packed codes and the tensors of their QuantState (absmax, nested absmax,
nested code, offset): about half a byte per weight. Neither x nor a dequantized W is kept.

The op is registered with `torch.library` as `fourbit::matmul_4bit` (forward) and
`fourbit::matmul_4bit_backward` (dx = dy W), each with a fake (meta) implementation and the
forward's autograd formula, so `torch.compile(fullgraph=True)` traces through it without graph
breaks and `torch.library.opcheck` can test the registration. A QuantState is not a type an op
schema can hold, so it crosses the op boundary as `state.as_tensors()` plus (shape, blocksize,
quant_type, dtype) and is rebuilt inside with `QuantState.from_tensors`.

Both ops call `fourbit.dispatch` and nothing else: it picks the fused Triton kernels
(`fourbit.kernels.matmul`) or the chunked reference (`fourbit.nf4.matmul`) per FOURBIT_BACKEND.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch
from ..nf4.state import QuantState

__all__ = ["matmul_4bit"]

@torch.library.custom_op("fourbit::matmul_4bit", mutates_args=())
def _matmul_op(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
               nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               shape: list[int], blocksize: int, quant_type: str, dtype: torch.dtype) -> torch.Tensor:
    state = QuantState.from_tensors(absmax, nested_absmax, nested_code, offset, shape=shape, dtype=dtype,
                                    blocksize=blocksize, quant_type=quant_type)
    return dispatch.matmul(x, packed, state, bias)


@_matmul_op.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, bias, shape, blocksize, quant_type, dtype):
    return x.new_empty(*x.shape[:-1], shape[0])


@torch.library.custom_op("fourbit::matmul_4bit_backward", mutates_args=())
def _matmul_backward_op(grad_y: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                        nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                        offset: Optional[torch.Tensor], shape: list[int], blocksize: int, quant_type: str,
                        dtype: torch.dtype) -> torch.Tensor:
    state = QuantState.from_tensors(absmax, nested_absmax, nested_code, offset, shape=shape, dtype=dtype,
                                    blocksize=blocksize, quant_type=quant_type)
    return dispatch.matmul_backward(grad_y, packed, state)


@_matmul_backward_op.register_fake
def _(grad_y, packed, absmax, nested_absmax, nested_code, offset, shape, blocksize, quant_type, dtype):
    return grad_y.new_empty(*grad_y.shape[:-1], shape[1])


def _setup_context(ctx, inputs, output):
    x, packed, absmax, nested_absmax, nested_code, offset, bias, shape, blocksize, quant_type, dtype = inputs
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, offset)  # never x, never a dense W
    ctx.meta = (shape, blocksize, quant_type, dtype)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_y):
    packed, absmax, nested_absmax, nested_code, offset = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _matmul_backward_op(grad_y, packed, absmax, nested_absmax, nested_code, offset, *ctx.meta)
    if ctx.needs_input_grad[6]:
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(ctx.bias_dtype)  # (N,)
    return grad_x, None, None, None, None, None, grad_bias, None, None, None, None


_matmul_op.register_autograd(_backward, setup_context=_setup_context)


def matmul_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None):
    """y = x @ dequantize(packed, state).T + bias, differentiable in x and bias.
    x: (..., K) fp32/fp16/bf16, state.shape = [N, K], bias: (N,) or None; y: (..., N) in x.dtype."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a fourbit QuantState, got {type(state).__name__}")
    absmax, nested_absmax, nested_code, offset = state.as_tensors()
    if len(state.shape) != 2:
        raise ValueError(f"matmul_4bit needs a 2-D quantized weight [N, K], got shape {tuple(state.shape)}")
    return _matmul_op(x, packed, absmax, nested_absmax, nested_code, offset, bias,
                      [int(d) for d in state.shape], state.blocksize, state.quant_type, state.dtype)
