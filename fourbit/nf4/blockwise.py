"""8-bit blockwise quantization with a 256-entry code (double quantization, 8-bit optimizer states).

    absmax[b] = max |x| over block b                      float32, (nb,)
    q[i]      = nearest(code, x[i] * (1 / absmax[b]))     uint8, shape of x
    x_hat[i]  = fl32(code[q[i]] * absmax[b])

Rounding follows bitsandbytes' CUDA kernel (`dQuantize<0>`): the value is scaled by the reciprocal
of the block's absmax, then the nearest code wins, compared against float32 midpoints
`fl32(c[j] + c[j+1]) * 0.5`; a value exactly on a midpoint goes to the code with the **even** index
(the binary search always ends on an even probe and keeps it on a tie). A block whose absmax is 0
gets code 0 everywhere (CUDA: 0 * inf = NaN falls to index 0; the CPU build special-cases it the same).

bitsandbytes' CPU build uses a 65536-bin lookup table instead, which differs near 0 (SPEC §3); the
tests prove each such difference is that quirk.
"""

from __future__ import annotations

import torch

__all__ = ["quantize_blockwise", "dequantize_blockwise", "nearest_code", "code_midpoints"]


def code_midpoints(code: torch.Tensor) -> torch.Tensor:
    """(len(code) - 1,) float32 midpoints fl32(code[j] + code[j+1]) * 0.5 of a sorted code: the
    decision boundaries of `nearest_code` (the Triton kernels search the same tensor)."""
    return (code[:-1] + code[1:]) * 0.5


def nearest_code(s: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted `code` for each float32 s; ties to the even index."""
    midpoints = code_midpoints(code)  # (len(code) - 1,)
    below = torch.bucketize(s, midpoints, right=False)  # midpoints strictly below s
    # s sits exactly on a midpoint when the first midpoint >= s equals it (one gather, not a second search)
    tie = (below < midpoints.numel()) & (midpoints[below.clamp(max=midpoints.numel() - 1)] == s)
    return torch.where(tie & (below % 2 == 1), below + 1, below)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `x` (any shape, float) to uint8 codes, one float32 absmax per block of the flat tensor."""
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    if code.numel() != 256:
        raise ValueError(f"code must have 256 entries, got {code.numel()}")
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, nb * blocksize - n)).view(nb, blocksize)  # (nb, bs)
    absmax = padded.abs().amax(dim=1) if n else torch.empty(0, device=x.device)  # (nb,)
    scaled = padded * (1.0 / absmax).unsqueeze(1)  # 0 * inf = NaN in all-zero blocks
    q = nearest_code(scaled, code.to(x.device)).to(torch.uint8)
    q = torch.where((absmax == 0).unsqueeze(1), torch.zeros_like(q), q)
    return q.view(-1)[:n].view(x.shape), absmax


def dequantize_blockwise(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of `quantize_blockwise`: fl32(code[q] * absmax[block]), then one rounding to `dtype`."""
    flat = code.to(q.device)[q.reshape(-1).long()]
    n = flat.numel()
    nb = absmax.numel()
    if nb != -(-n // blocksize):
        raise ValueError(f"absmax has {nb} blocks but {n} codes in blocks of {blocksize} need {-(-n // blocksize)}")
    padded = torch.nn.functional.pad(flat, (0, nb * blocksize - n)).view(nb, blocksize)
    out = (padded * absmax.float().unsqueeze(1)).view(-1)[:n]
    return out.to(dtype).view(q.shape)
