"""8-bit AdamW states: against bitsandbytes' CPU AdamW8bit, against 32-bit AdamW, and the Triton kernel.

bitsandbytes' CPU build requantizes the states with a 65536-bin lookup table (SPEC §3), fourbit with
the exact nearest code (CUDA semantics). After one step the float states are equal (the absmax
scales match exactly), and every differing code is proven to be that quirk: bitsandbytes' code
equals a model of the lookup-table quantizer written here from SPEC §3 (for every element), ours
is a nearest code, and the two differ exactly where the table and the nearest code disagree.

The Triton kernel tests run on a GPU when there is one, otherwise under Triton's interpreter
(tests/conftest.py turns it on before anything imports triton); if triton was imported compiled
anyway (TRITON_INTERPRET=0 given explicitly, no GPU), a child Python reruns them interpreted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fourbit.kernels._triton_utils import interpreting
from fourbit.nf4 import dynamic_map, quantize_blockwise
from fourbit.optim import AdamW, AdamW8bit
from fourbit.nf4.adamw import adamw_update_8bit
from helpers import cpu_lut_quantize, one_thread_quiet_bnb, rel_err  # noqa: F401 (an autouse fixture)

REPO = Path(__file__).resolve().parents[1]
INTERPRETED = interpreting()
ON_GPU = torch.cuda.is_available() and not INTERPRETED
kernels_here = pytest.mark.skipif(
    not (INTERPRETED or ON_GPU), reason="no GPU: runs in the TRITON_INTERPRET=1 child (test_kernel_under_interpreter)"
)


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def is_nearest(q: torch.Tensor, s: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Per element: is code[q] as close to s as any code (float64 distances, 1e-7 relative slack)?"""
    dist = (s.double().unsqueeze(-1) - code.double()).abs()  # (n, 256)
    return dist.gather(-1, q.long().unsqueeze(-1)).squeeze(-1) <= dist.min(-1).values * (1 + 1e-7) + 1e-45


@pytest.mark.bnb
def test_lut_model_reproduces_bitsandbytes_cpu_quantizer():
    import bitsandbytes.functional as F

    g = torch.Generator().manual_seed(fresh_seed())
    for signed in (True, False):
        code = dynamic_map(signed=signed)
        x = torch.randn(5000, generator=g) * 0.01
        x = x if signed else x * x
        q, state = F.quantize_blockwise(x, code=code, blocksize=256)
        q_model, absmax_model = cpu_lut_quantize(x, code)
        assert torch.equal(q.view(-1), q_model) and torch.equal(state.absmax, absmax_model)


@pytest.mark.bnb
@pytest.mark.parametrize("shape", [(4096,), (64, 129), (5000,)])
def test_states_after_one_step_equal_bitsandbytes_except_the_lut_quirk(shape):
    import bitsandbytes as bnb

    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    w, grad = torch.randn(shape, generator=g), torch.randn(shape, generator=g) * 0.1
    states = {}
    for name, cls in (("ours", AdamW8bit), ("bnb", bnb.optim.AdamW8bit)):
        p = torch.nn.Parameter(w.clone())
        opt = cls([p], lr=1e-3)
        p.grad = grad.clone()
        opt.step()
        states[name] = opt.state[p] if name == "bnb" else opt.state_dict()["state"][0]
    ours, theirs = states["ours"], states["bnb"]
    # The float states before quantization (zero states, one step): m = (1-b1) g, v = (1-b2) g^2.
    m = torch.zeros(grad.numel()).mul_(0.9).add_(grad.view(-1), alpha=1 - 0.9)
    v = torch.zeros(grad.numel()).mul_(0.999).addcmul_(grad.view(-1), grad.view(-1), value=1 - 0.999)
    differing = 0
    for key, x, code in (("1", m, dynamic_map(signed=True)), ("2", v, dynamic_map(signed=False))):
        assert torch.equal(ours["absmax" + key], theirs["absmax" + key]), f"absmax{key} (seed {seed})"
        q_ours, q_bnb = ours["state" + key].view(-1), theirs["state" + key].view(-1)
        q_lut, absmax = cpu_lut_quantize(x, code)
        assert torch.equal(q_bnb, q_lut), f"bitsandbytes is not the LUT quantizer (seed {seed})"
        assert torch.equal(q_ours, quantize_blockwise(x, code)[0]), f"ours is not fourbit.nf4's quantizer (seed {seed})"
        scaled = x * (1.0 / absmax).repeat_interleave(256)[: x.numel()]  # (n,) x / its block's absmax
        assert bool(is_nearest(q_ours, scaled, code).all()), f"ours not nearest (seed {seed})"
        diff = q_ours != q_bnb
        assert torch.equal(diff, q_lut != q_ours)
        differing += int(diff.sum())
    print(f"{shape}: {differing} of {2 * grad.numel()} codes differ, each one the LUT quirk")


@pytest.mark.bnb
def test_100_steps_within_1e3_of_bitsandbytes():
    import bitsandbytes as bnb

    seed = fresh_seed()
    shapes = [(64, 129), (4096,), (33, 17)]  # the last keeps float32 states (< min_8bit_size)
    results = {}
    for name, cls in (("ours", AdamW8bit), ("bnb", bnb.optim.AdamW8bit)):
        g = torch.Generator().manual_seed(seed)
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        opt = cls(params, lr=1e-3, weight_decay=0.05)
        for _ in range(100):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g) * 0.1
            opt.step()
        results[name] = params
    for a, b in zip(results["ours"], results["bnb"]):
        assert rel_err(a, b) <= 1e-3, f"{tuple(a.shape)}: rel {rel_err(a, b):.2e} (seed {seed})"
    small = rel_err(results["ours"][2], results["bnb"][2])  # float32 states: the 32-bit bound
    assert small <= 1e-6, f"(33, 17): rel {small:.2e} (seed {seed})"


def test_regression_converges_like_32bit():
    """Least squares, 8192 weights: the 8-bit optimizer ends within 1 % of the 32-bit loss."""
    g = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(512, 128, generator=g)
    w_true = torch.randn(128, 64, generator=g) / 128**0.5
    y = x @ w_true + 0.05 * torch.randn(512, 64, generator=g)
    losses = {}
    for cls in (AdamW, AdamW8bit):
        w = torch.nn.Parameter(torch.zeros(128, 64))
        opt = cls([w], lr=1e-2, weight_decay=0.0)
        for _ in range(300):
            loss = ((x @ w - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[cls.__name__] = ((x @ w - y) ** 2).mean().item()
    assert losses["AdamW"] < 0.01, losses  # converged near the noise floor (0.0025)
    assert abs(losses["AdamW8bit"] - losses["AdamW"]) <= 0.01 * losses["AdamW"], losses


# -- the Triton kernel ----------------------------------------------------------------------------
@pytest.mark.skipif(INTERPRETED or ON_GPU, reason="the kernel tests run in this process")
def test_kernel_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-k", "kernel", "-p", "no:cacheprovider",
           "-W", "ignore::RuntimeWarning"]  # fmt: skip
    child = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    tail = child.stdout[-8000:] + child.stderr[-4000:]
    assert child.returncode == 0, f"interpreter run failed:\n{tail}"
    assert " passed" in child.stdout and " failed" not in child.stdout, tail


def random_states(n: int, g: torch.Generator, device: str):
    m = torch.randn(n, generator=g) * 0.1
    v = torch.rand(n, generator=g) * 0.01
    if n > 512:
        m[256:512] = 0  # an all-zero block
        v[256:512] = 0
    q1, a1 = quantize_blockwise(m, dynamic_map(signed=True))
    q2, a2 = quantize_blockwise(v, dynamic_map(signed=False))
    return [t.to(device) for t in (q1, q2, a1, a2)]


@kernels_here
@pytest.mark.parametrize("n", [1, 255, 256, 1000, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_reference(n, dtype):
    from fourbit.kernels.adamw import adamw_update_8bit as kernel_update

    device = "cuda" if ON_GPU else "cpu"
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=g).to(dtype).to(device)
    qmaps = [dynamic_map(signed=True).to(device), dynamic_map(signed=False).to(device)]
    ref_states = random_states(n, g, device)
    ker_states = [t.clone() for t in ref_states]
    p_ref, p_ker = p.clone(), p.clone()
    for step in (1, 2, 3):
        grad = torch.randn(n, generator=g).to(dtype).to(device)
        hyper = dict(lr=1e-2, beta1=0.9, beta2=0.995, eps=1e-8, weight_decay=0.01 * step, step=step)
        adamw_update_8bit(p_ref, grad, *ref_states, *qmaps, **hyper)
        kernel_update(p_ker, grad, *ker_states, *qmaps, **hyper)
        for name, a, b in zip(("q1", "q2", "absmax1", "absmax2"), ker_states, ref_states):
            assert torch.equal(a, b), f"{name} n={n} step {step} (seed {seed})"
        if dtype == torch.float32 or ON_GPU:
            assert torch.equal(p_ker, p_ref), f"p n={n} step {step} (seed {seed})"
        else:  # the interpreter truncates fp32 -> bf16; accept either neighbour of the exact value
            exact = p_ref.float()
            ok = (p_ker == p_ref) | ((p_ker.float() - exact).abs() <= exact.abs() * 2**-7)
            assert bool(ok.all()), f"p n={n} step {step} (seed {seed})"
            p_ker.copy_(p_ref)


@kernels_here
@pytest.mark.parametrize("n", [1, 1000, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_32bit_equals_reference(n, dtype):
    from fourbit.kernels.adamw import adamw_update_32bit as kernel_update
    from fourbit.nf4.adamw import adamw_update_32bit

    device = "cuda" if ON_GPU else "cpu"
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=g).to(dtype).to(device)
    m, v = (torch.randn(n, generator=g) * 0.1).to(device), (torch.rand(n, generator=g) * 0.01).to(device)
    ref, ker = [p.clone(), m.clone(), v.clone()], [p.clone(), m.clone(), v.clone()]
    for step, weight_decay in ((1, 0.0), (2, 0.1), (3, 0.01)):
        grad = torch.randn(n, generator=g).to(dtype).to(device)
        hyper = dict(lr=1e-2, beta1=0.9, beta2=0.995, eps=1e-8, weight_decay=weight_decay, step=step)
        adamw_update_32bit(ref[0], grad, ref[1], ref[2], **hyper)
        kernel_update(ker[0], grad, ker[1], ker[2], **hyper)
        assert torch.equal(ker[1], ref[1]) and torch.equal(ker[2], ref[2]), f"m, v n={n} step {step} (seed {seed})"
        if dtype == torch.float32 or ON_GPU:
            assert torch.equal(ker[0], ref[0]), f"p n={n} step {step} (seed {seed})"
        else:  # the interpreter truncates fp32 -> bf16; accept either neighbour of the exact value
            exact = ref[0].float()
            ok = (ker[0] == ref[0]) | ((ker[0].float() - exact).abs() <= exact.abs() * 2**-7)
            assert bool(ok.all()), f"p n={n} step {step} (seed {seed})"
            ker[0].copy_(ref[0])


@kernels_here
@pytest.mark.parametrize("cls_name", ["PagedAdamW", "PagedAdamW8bit"])
def test_kernel_optimizer_equals_reference_optimizer(monkeypatch, cls_name):
    """The optimizers on the Triton backend (FOURBIT_BACKEND=triton) == on the reference, through the pager."""
    import fourbit.optim

    device = "cuda" if ON_GPU else "cpu"
    cls = getattr(fourbit.optim, cls_name)
    seed = fresh_seed()
    shapes = [(64, 129), (300,), (4097,)]
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("FOURBIT_BACKEND", backend)
        g = torch.Generator().manual_seed(seed)
        params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]
        opt = cls(params, lr=1e-2, page_bytes=4096, device_budget_bytes=3 * 4096)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(device)
            opt.step()
        results[backend] = params
    for a, b in zip(results["triton"], results["reference"]):
        assert torch.equal(a, b), f"{cls_name} {tuple(a.shape)} (seed {seed})"


@kernels_here
def test_kernel_rejects_bad_input():
    from fourbit.kernels.adamw import adamw_update_8bit as kernel_update

    device = "cuda" if ON_GPU else "cpu"
    p = torch.zeros(300, device=device)
    q = torch.zeros(300, dtype=torch.uint8, device=device)
    absmax = torch.zeros(2, device=device)
    qmap = dynamic_map().to(device)
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    with pytest.raises(ValueError, match="absmax1 must be"):
        kernel_update(p, p, q, q, absmax[:1], absmax, qmap, qmap, **hyper)
    with pytest.raises(ValueError, match="q2 must be"):
        kernel_update(p, p, q, q.float(), absmax, absmax, qmap, qmap, **hyper)
    with pytest.raises(ValueError, match="step counts from 1"):
        kernel_update(p, p, q, q, absmax, absmax, qmap, qmap, **{**hyper, "step": 0})
