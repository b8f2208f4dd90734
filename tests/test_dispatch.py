"""fourbit.dispatch: the one place that picks the reference or the Triton kernels.

* FOURBIT_BACKEND=reference: a forward + backward of Linear4bit (and an AdamW step) never imports
  Triton or fourbit.kernels. Checked in a fresh child Python in which `import triton` fails: torch
  itself probes for triton the first time a custom op runs (torch._dynamo.utils calls
  `has_triton_package()`, which treats ImportError as "absent"), so the child makes triton
  unimportable; any import of it by fourbit would then raise and fail the run.
* FOURBIT_BACKEND=triton (interpreter on CPU): every op reaches its kernel through dispatch, and the
  reference of that op is not called; a weight the fused matmul cannot run goes to the reference,
  decided by dispatch (the kernel launcher itself raises ValueError).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fourbit import dispatch, nf4
from fourbit.kernels._triton_utils import interpreting
from fourbit.lora import Linear4bit

REPO = Path(__file__).resolve().parents[1]
needs_interpreter = pytest.mark.skipif(not interpreting(), reason="needs triton imported with TRITON_INTERPRET=1")

REFERENCE_ONLY = """
import sys
sys.modules["triton"] = None  # `import triton` raises ImportError from here on
import torch
from fourbit.lora import Linear4bit
from fourbit.optim import AdamW8bit
torch.manual_seed(0)
layer = Linear4bit(64, 32, quant_type="nf4")
layer.bias.requires_grad_(True)
x = torch.randn(3, 64, requires_grad=True)
layer(x).square().sum().backward()
assert x.grad is not None and layer.bias.grad is not None
p = torch.nn.Parameter(torch.randn(5000))
p.grad = torch.randn(5000)
AdamW8bit([p]).step()
loaded = sorted(m for m in sys.modules if m.startswith(("triton.", "fourbit.kernels")))
assert sys.modules["triton"] is None
print(loaded)
"""


def test_reference_backend_never_imports_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(FOURBIT_BACKEND="reference", PYTHONPATH=str(REPO))
    child = subprocess.run([sys.executable, "-c", REFERENCE_ONLY], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.strip() == "[]", f"imported under FOURBIT_BACKEND=reference: {child.stdout.strip()}"


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("FOURBIT_BACKEND", raising=False)
    x = torch.randn(64, 64)
    # auto: CPU tensors take the CPU kernels where they load (tests/test_cpu_kernels.py), else the reference
    assert dispatch.backend_for(x) == ("cpu" if dispatch.cpu_kernels_available() else "reference")
    monkeypatch.setenv("FOURBIT_BACKEND", "reference")
    assert dispatch.backend_for(x) == "reference"
    monkeypatch.delenv("FOURBIT_BACKEND")
    packed, state = dispatch.quantize(x)
    assert torch.equal(dispatch.dequantize(packed, state), nf4.dequantize(packed, state))
    monkeypatch.setenv("FOURBIT_BACKEND", " Triton ")
    assert dispatch.backend_for(x) == ("triton" if os.environ.get("TRITON_INTERPRET") == "1" else "reference")


def test_backend_rejects_unknown_name_and_cpu_triton_without_interpreter(monkeypatch):
    monkeypatch.setenv("FOURBIT_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="auto.*reference.*triton"):
        dispatch.backend_for(torch.zeros(1))
    monkeypatch.setenv("FOURBIT_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.backend_for(torch.zeros(1))


class Spies:
    """Replace module functions by counting wrappers; `calls[name]` counts each one."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.calls: dict[str, int] = {}

    def wrap(self, module_name: str, fn: str) -> None:
        __import__(module_name)
        module = sys.modules[module_name]  # the module: fourbit.nf4.matmul is also a function name
        real = getattr(module, fn)
        key = f"{module_name}.{fn}"
        self.calls[key] = 0

        def spy(*args, **kwargs):
            self.calls[key] += 1
            return real(*args, **kwargs)

        self.monkeypatch.setattr(module, fn, spy)


OPS = [("fourbit.nf4.quant", "fourbit.kernels.quantize", "quantize"),
       ("fourbit.nf4.quant", "fourbit.kernels.dequantize", "dequantize"),
       ("fourbit.nf4.matmul", "fourbit.kernels.matmul", "matmul"),
       ("fourbit.nf4.matmul", "fourbit.kernels.matmul", "matmul_backward"),
       ("fourbit.nf4.adamw", "fourbit.kernels.adamw", "adamw_update_32bit"),
       ("fourbit.nf4.adamw", "fourbit.kernels.adamw", "adamw_update_8bit")]


@pytest.fixture
def spies(monkeypatch):
    s = Spies(monkeypatch)
    for reference, kernel, fn in OPS:
        s.wrap(reference, fn)
        s.wrap(kernel, fn)
    return s


@needs_interpreter
def test_triton_backend_runs_every_kernel_through_dispatch(monkeypatch, spies):
    """A QLoRA step's ops under FOURBIT_BACKEND=triton: each kernel runs, no reference op does."""
    monkeypatch.setenv("FOURBIT_BACKEND", "triton")
    from fourbit.optim import AdamW, AdamW8bit

    torch.manual_seed(0)
    layer = Linear4bit(64, 16, quant_type="nf4")  # quantize: kernel
    layer.bias.requires_grad_(True)
    x = torch.randn(5, 64, requires_grad=True)
    layer(x).square().sum().backward()  # matmul + matmul_backward: kernels
    layer.dequantize()
    big, small = torch.nn.Parameter(torch.randn(4096)), torch.nn.Parameter(torch.randn(16))
    big.grad, small.grad = torch.randn(4096), torch.randn(16)
    AdamW8bit([big]).step()
    AdamW([small]).step()
    for reference, kernel, fn in OPS:
        assert spies.calls[f"{kernel}.{fn}"] >= 1, f"{kernel}.{fn} never ran"
        assert spies.calls[f"{reference}.{fn}"] == 0, f"{reference}.{fn} ran under FOURBIT_BACKEND=triton"


@needs_interpreter
def test_unsupported_matmul_shape_goes_to_reference_in_dispatch(monkeypatch, spies):
    """K % 64 != 0: the kernel refuses with ValueError, dispatch runs the reference instead."""
    monkeypatch.setenv("FOURBIT_BACKEND", "triton")
    kernel = sys.modules["fourbit.kernels.matmul"]
    packed, state = nf4.quantize(torch.randn(8, 96), blocksize=32)
    x = torch.randn(3, 96)
    assert not kernel.fused_shape_supported(state)
    with pytest.raises(ValueError, match="K % 64"):
        kernel.matmul(x, packed, state)
    with pytest.raises(ValueError, match="K % 64"):
        kernel.matmul_backward(torch.randn(3, 8), packed, state)
    assert torch.equal(dispatch.matmul(x, packed, state), nf4.matmul(x, packed, state))
    gy = torch.randn(3, 8)
    assert torch.equal(dispatch.matmul_backward(gy, packed, state), gy @ nf4.dequantize(packed, state))
    assert spies.calls["fourbit.nf4.matmul.matmul"] == 1 and spies.calls["fourbit.nf4.matmul.matmul_backward"] == 1
