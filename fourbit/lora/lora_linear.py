"""LoRALinear: a frozen base layer plus a trainable low-rank update (LoRA, Hu et al. 2021; QLoRA).

    y = base(x) + s * B(A(dropout(x)))      A: (r, K), B: (N, r), x: (..., K), y: (..., N)
    s = alpha / r                            (rsLoRA: alpha / sqrt(r), which keeps the update's
                                              scale independent of r, Kalajdzievski 2023)

Initialisation follows PEFT's default, so the same seed gives the same adapter: A is
Kaiming-uniform with a = sqrt(5) (nn.Linear's own default, bound 1/sqrt(K)), B is zero, so the
wrapped layer starts out computing exactly base(x).

Order of operations, also PEFT's (so outputs match bit for bit): x is cast to the adapter dtype,
dropout, A, B, times s, the result cast to base(x)'s dtype and added to base(x).

The base may be a `Linear4bit` (QLoRA) or a plain `nn.Linear`; it is frozen by `add_lora`, not here.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .. import dispatch
from .layers import Linear4bit

__all__ = ["LoRALinear", "check_lora_args"]


def check_lora_args(r, alpha, dropout) -> None:
    """ValueError unless r is a positive int, alpha > 0 and 0 <= dropout < 1."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


class LoRALinear(nn.Module):
    """`base(x) + scaling * lora_B(lora_A(dropout(x)))`; see the module docstring.

    Attributes: base, lora_A (nn.Linear K -> r, no bias), lora_B (nn.Linear r -> N, no bias),
    dropout, r, alpha, use_rslora, scaling, enabled.
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        r: int = 16,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        check_lora_args(r, alpha, dropout)
        if not isinstance(base, (Linear4bit, nn.Linear)):
            raise TypeError(f"LoRALinear wraps a Linear4bit or nn.Linear, got {type(base).__name__}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"adapter dtype must be a float dtype, got {dtype}")
        device = base.weight.device
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r = r
        self.set_alpha(alpha, use_rslora=use_rslora)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)  # weight (r, K)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)  # weight (N, r)
        self.set_dropout(dropout)
        self.enabled = True
        self.reset_lora_parameters()

    def set_alpha(self, alpha: float, *, use_rslora: bool = False) -> None:
        """Set alpha and the scaling it implies: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        check_lora_args(self.r, alpha, 0.0)
        self.alpha, self.use_rslora = alpha, bool(use_rslora)
        self.scaling = alpha / math.sqrt(self.r) if use_rslora else alpha / self.r

    def set_dropout(self, p: float) -> None:
        """Replace the dropout on the adapter input (p = 0 means none); keeps train/eval mode."""
        check_lora_args(self.r, 1, p)
        self.dropout = (nn.Dropout(p) if p > 0 else nn.Identity()).train(self.training)

    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform(a=sqrt(5)), B = 0: the update B A starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., N)
        if not self.enabled:
            return y
        h = self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))  # (..., r)
        return y + (self.lora_B(h) * self.scaling).to(y.dtype)

    @contextlib.contextmanager
    def disabled(self):
        """Context in which the layer computes base(x) only (evaluation without the adapter)."""
        previous, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = previous

    def delta_weight(self) -> torch.Tensor:
        """The dense update s * B @ A, (N, r) @ (r, K) -> (N, K), in float32."""
        return self.scaling * (self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float())

    def _base_weight(self) -> torch.Tensor:
        if isinstance(self.base, Linear4bit):
            return dispatch.dequantize(self.base.weight.detach(), self.base.quant_state, dtype=torch.float32)
        return self.base.weight.detach().float()

    def _base_dtype(self) -> torch.dtype:
        return self.base.quant_state.dtype if isinstance(self.base, Linear4bit) else self.base.weight.dtype

    def merge(self) -> nn.Linear:
        """A new dense nn.Linear computing base(x) + s B A x: W' = W + s B A in float32, stored in the
        base weight's dtype (the bias is shared). The LoRALinear itself is left unchanged, so
        evaluation without the adapter stays available through `disabled()`."""
        merged = (self._base_weight() + self.delta_weight()).to(self._base_dtype())  # (N, K)
        bias = self.base.bias
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=merged.device, dtype=merged.dtype)
        with torch.no_grad():
            out.weight.copy_(merged)
        if bias is not None:
            out.bias = bias
        return out

    def merge_requantized(self) -> tuple[Linear4bit, float]:
        """The merged weight quantized again with the base layer's settings, and the error that this
        second quantization adds: ||Q(W') - W'||_F / ||W'||_F in float64 (W' = W + s B A)."""
        if not isinstance(self.base, Linear4bit):
            raise TypeError("merge_requantized needs a Linear4bit base; use merge() for a dense base")
        dense = self.merge()
        q = Linear4bit.from_linear(
            dense,
            quant_type=self.base.quant_type,
            double_quant=self.base.double_quant,
            blocksize=self.base.blocksize,
            compute_dtype=self.base.compute_dtype,
            quant_storage=self.base.quant_storage,
        )
        reference = dense.weight.detach().double()
        error = (q.dequantize(torch.float64) - reference).norm() / reference.norm().clamp_min(1e-300)
        return q, float(error)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, use_rslora={self.use_rslora}, enabled={self.enabled}"
