"""fourbit.dispatch: the one place that picks the reference or the Triton kernels.

* FOURBIT_BACKEND=reference: a forward + backward of Linear4bit (and an AdamW step) never imports
  Triton, fourbit.kernels or fourbit.cpu (the C kernels are not even built). Checked in a fresh child Python in which `import triton` fails: torch
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
loaded = sorted(m for m in sys.modules if m.startswith(("triton.", "fourbit.kernels", "fourbit.cpu")))
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


# ---- the CPU kernels ----------------------------------------------------------------------------
CPU_OPS = [("fourbit.nf4.quant", "fourbit.cpu.quant", "quantize"),
           ("fourbit.nf4.quant", "fourbit.cpu.quant", "dequantize"),
           ("fourbit.nf4.matmul", "fourbit.cpu.matmul", "matmul"),
           ("fourbit.nf4.matmul", "fourbit.cpu.matmul", "matmul_backward"),
           ("fourbit.nf4.adamw", "fourbit.cpu.adamw", "adamw_update_32bit"),
           ("fourbit.nf4.adamw", "fourbit.cpu.adamw", "adamw_update_8bit"),
           ("fourbit.nf4.blockwise", "fourbit.cpu.blockwise", "quantize_blockwise"),
           ("fourbit.nf4.blockwise", "fourbit.cpu.blockwise", "dequantize_blockwise")]
needs_cpu_kernels = pytest.mark.skipif(not dispatch.cpu_kernels_available(), reason="the CPU kernels did not load")


@needs_cpu_kernels
@pytest.mark.parametrize("choice", ["auto", "cpu"])
def test_cpu_backend_runs_every_kernel_through_dispatch(monkeypatch, choice):
    """A QLoRA step's ops and the 8-bit blockwise codes under auto and cpu: each CPU kernel runs,
    no reference op does (the CPU modules import the functions they call by name from fourbit.cpu.*,
    so the spies sit there; the package-level names are what dispatch imports)."""
    import fourbit.cpu as cpu_pkg

    monkeypatch.setenv("FOURBIT_BACKEND", choice)
    spies = Spies(monkeypatch)
    for reference, kernel, fn in CPU_OPS:
        spies.wrap(reference, fn)
        spies.wrap(kernel, fn)
        monkeypatch.setattr(cpu_pkg, fn, getattr(sys.modules[kernel], fn))  # dispatch's `from .cpu import fn`
    from fourbit.optim import AdamW, AdamW8bit

    torch.manual_seed(0)
    layer = Linear4bit(64, 16, quant_type="nf4")
    layer.bias.requires_grad_(True)
    x = torch.randn(5, 64, requires_grad=True)
    layer(x).square().sum().backward()
    layer.dequantize()
    big, small = torch.nn.Parameter(torch.randn(4096)), torch.nn.Parameter(torch.randn(16))
    big.grad, small.grad = torch.randn(4096), torch.randn(16)
    AdamW8bit([big]).step()
    AdamW([small]).step()
    q, absmax = dispatch.quantize_blockwise(torch.randn(1000), nf4.dynamic_map())
    dispatch.dequantize_blockwise(q, absmax, nf4.dynamic_map())
    for reference, kernel, fn in CPU_OPS:
        assert spies.calls[f"{kernel}.{fn}"] >= 1, f"{kernel}.{fn} never ran"
        assert spies.calls[f"{reference}.{fn}"] == 0, f"{reference}.{fn} ran under FOURBIT_BACKEND={choice}"


FALLBACK = """
import sys, torch
from fourbit import dispatch, nf4
from fourbit.lora import Linear4bit
torch.manual_seed(0)
x = torch.randn(3, 64, requires_grad=True)
packed, state = dispatch.quantize(torch.randn(32, 64))
assert torch.equal(dispatch.dequantize(packed, state), nf4.dequantize(packed, state))
layer = Linear4bit(64, 32, quant_type="nf4")
layer(x).sum().backward()
print(dispatch.backend_for(x), x.grad is not None)
"""


@pytest.mark.parametrize("hide", ["CC=/bin/false", "no compiler on PATH"])
def test_without_a_compiler_everything_runs_on_the_reference_and_says_so_once(tmp_path, hide):
    """A fresh cache and no working compiler: auto falls back to the reference with exactly one line
    on stderr naming why; FOURBIT_BACKEND=cpu fails with that reason instead of a traceback's worth."""
    env = {k: v for k, v in os.environ.items() if k not in ("FOURBIT_BACKEND", "CC")}
    env.update(PYTHONPATH=str(REPO), FOURBIT_CACHE=str(tmp_path / "cache"))
    if hide == "CC=/bin/false":
        env["CC"] = "/bin/false"
    else:
        env["PATH"] = str(tmp_path / "empty-bin")
    child = subprocess.run([sys.executable, "-c", FALLBACK], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.split() == ["reference", "True"]
    notices = [line for line in child.stderr.splitlines() if "CPU kernels unavailable" in line]
    assert len(notices) == 1 and "using the PyTorch reference" in notices[0], child.stderr
    assert ("/bin/false" in notices[0]) if hide == "CC=/bin/false" else ("not on PATH" in notices[0])
    assert not (tmp_path / "cache" / "cpu-kernels").exists() or not any((tmp_path / "cache" / "cpu-kernels").rglob("*.so"))
    if hide != "CC=/bin/false":
        return
    env["FOURBIT_BACKEND"] = "cpu"
    forced = subprocess.run([sys.executable, "-c", "import torch\nfrom fourbit import dispatch\n"
                             "from fourbit.errors import Unavailable\n"
                             "try:\n    dispatch.dequantize(*dispatch.quantize(torch.randn(64)))\n"
                             "except Unavailable as err:\n    print('refused:', err)\n"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert forced.returncode == 0 and forced.stdout.startswith("refused: "), forced.stderr[-2000:]
    assert len(forced.stdout.strip().splitlines()) == 1


@needs_cpu_kernels
def test_a_second_process_loads_the_cached_build(tmp_path):
    """Built once per machine: the first process compiles into the cache (to a temporary name, then
    renamed), the next one only loads it; no temporary file is left behind."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "FOURBIT_CACHE": str(tmp_path)}
    env.pop("FOURBIT_BACKEND", None)
    probe = "from fourbit.cpu import _lib\nprint(_lib.built_here(), round(_lib.build_seconds(), 2), _lib.isa_name())"
    first, second = (subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                                    timeout=300) for _ in range(2))
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    assert first.stdout.split()[0] == "True" and second.stdout.split()[0] == "False"
    files = sorted(p.name for p in (tmp_path / "cpu-kernels").rglob("*") if p.is_file())
    assert files == ["libfourbit_cpu.so"], files


@needs_cpu_kernels
@pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info(), reason="torch is not built with OpenMP here")
def test_the_kernels_run_on_torchs_openmp_team(tmp_path):
    """One team of threads for torch's ops and the kernels (two teams on two cores slowed a training
    step several-fold under load); with a compiler that has no OpenMP the kernels still build, with
    threads of their own, and give the same bytes."""
    wrapper = tmp_path / "cc-without-openmp"
    wrapper.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && { echo "error: no OpenMP" >&2; exit 1; }; done\n'
                       'exec cc "$@"\n')
    wrapper.chmod(0o755)
    probe = ("import torch\nfrom fourbit.cpu import _lib\nfrom fourbit import dispatch\n"
             "torch.manual_seed(0)\nq, s = dispatch.quantize(torch.randn(4096, 512))\n"
             "print(_lib.team(), dispatch.backend_for(q), dispatch.dequantize(q, s).double().sum().item())")
    outs = []
    for cc in ("cc", str(wrapper)):
        env = {**os.environ, "PYTHONPATH": str(REPO), "FOURBIT_CACHE": str(tmp_path / "cache"), "CC": cc}
        env.pop("FOURBIT_BACKEND", None)
        child = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert child.returncode == 0, child.stderr[-2000:]
        outs.append(child.stdout.split())
    assert outs[0][:2] == ["torch", "cpu"] and outs[1][:2] == ["own", "cpu"], outs
    assert outs[0][2] == outs[1][2]
