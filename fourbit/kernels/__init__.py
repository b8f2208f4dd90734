"""fourbit.kernels: Triton versions of the fourbit.nf4 operations, same names and signatures.

    packed, state = quantize(w, blocksize=64, quant_type="nf4", double_quant=True)   # CUDA tensors
    w_hat = dequantize(packed, state)

On CPU tensors they run under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported).
`python -m fourbit.kernels.analysis.report` compiles every kernel for sm_80/sm_89/sm_90a without a GPU.
"""

from .dequantize import dequantize
from .matmul import matmul
from .quantize import quantize

__all__ = ["dequantize", "matmul", "quantize"]
