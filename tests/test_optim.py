"""fourbit's AdamW / PagedAdamW (32-bit states) and the pager.

* 32-bit parity: 100 steps on random problems match bitsandbytes' CPU AdamW and PagedAdamW and
  torch.optim.AdamW within 1e-6 relative (fp32 parameters; bf16: one bf16 rounding). Not bit for
  bit with bitsandbytes: torch's CPU sqrt is one ulp off for ~0.6 % of inputs, fourbit's is
  correctly rounded (as CUDA's and the Triton kernel's).
* The pager on its own: a random sequence of page operations against a plain dict of page
  contents (no lost or stale bytes), the budget after every operation, LRU eviction order.
* Paged == unpaged: a budget of 25 % of the states evicts pages every step; 50 steps give the
  same bits, and the budget holds at every page-in.
* Resume: save after 20 steps, load into a fresh optimizer, steps 21-40 equal an uninterrupted run.
* Bad input: sparse and non-finite gradients, budgets below one page, foreign state dicts.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fourbit.optim import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit
from fourbit.nf4.adamw import adamw_update_32bit
from fourbit.train.optim import PagePool, StateLayout
from fourbit.train.optim.saved_state import WRAPPED
from helpers import one_thread_quiet_bnb, rel_err  # noqa: F401 (an autouse fixture)
from fourbit.nf4.adamw import sqrt_rn

SHAPES = [(1,), (7,), (63,), (65,), (33, 17), (4097,), (64, 129)]


def flat(entry: dict) -> dict:
    """One parameter's saved state with bitsandbytes' nested state tensors brought up a level."""
    out = {k: v for k, v in entry.items() if k != WRAPPED}
    out.update(entry.get(WRAPPED, {}))
    return out


def make_params(shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def run(make_opt, shapes, dtype, seed, steps, grad_scale=1.0):
    """Parameters after `steps` steps with fresh random gradients (the same for every optimizer)."""
    params = make_params(shapes, dtype, seed)
    opt = make_opt(params)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * grad_scale).to(dtype)
        opt.step()
    return params, opt


# -- 32-bit parity ------------------------------------------------------------------------------
@pytest.mark.bnb
@settings(max_examples=10)
@given(
    lr=st.floats(1e-4, 5e-2),
    beta1=st.floats(0.5, 0.95),
    beta2=st.floats(0.9, 0.9999),
    eps=st.sampled_from([1e-8, 1e-6, 1e-3]),
    weight_decay=st.sampled_from([0.0, 1e-2, 0.1]),
    shapes=st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    grad_scale=st.sampled_from([1e-3, 1.0, 30.0]),
    seed=st.integers(0, 2**30),
)
def test_32bit_matches_bitsandbytes_and_torch(lr, beta1, beta2, eps, weight_decay, shapes, dtype, grad_scale, seed):
    import bitsandbytes as bnb

    hyper = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
    ours, _ = run(lambda ps: AdamW(ps, **hyper), shapes, dtype, seed, 100, grad_scale)
    start = make_params(shapes, dtype, seed)
    # Errors are relative to the parameter's scale: the larger of its start and end norms (a
    # one-element parameter that ends near zero would otherwise turn a 1-ulp difference into 1e-5).
    scale = [max(a.double().norm().item(), s.double().norm().item()) for a, s in zip(ours, start)]
    # fp32: 1e-6. bf16: both round to bf16 every step, and bitsandbytes' one-ulp-off CPU sqrt (see
    # functional.py) flips a rounding now and then: one bf16 ulp (2^-8 relative) per tensor.
    tol = 1e-6 if dtype == torch.float32 else 2**-8
    for bnb_cls in (bnb.optim.AdamW, bnb.optim.PagedAdamW):
        theirs, _ = run(lambda ps: bnb_cls(ps, **hyper), shapes, dtype, seed, 100, grad_scale)
        for a, b, norm in zip(ours, theirs, scale):
            err = (a.double() - b.double()).norm().item() / norm
            assert err <= tol, f"{bnb_cls.__name__} {tuple(a.shape)} {dtype}: rel {err:.2e}"
    if dtype == torch.float32:
        ref, _ = run(lambda ps: torch.optim.AdamW(ps, **hyper), shapes, dtype, seed, 100, grad_scale)
        for a, b, norm in zip(ours, ref, scale):
            err = (a.double() - b.double()).norm().item() / norm
            assert err <= 1e-6, f"torch.optim.AdamW {tuple(a.shape)}: rel {err:.2e}"


@pytest.mark.bnb
def test_param_groups_match_bitsandbytes():
    import bitsandbytes as bnb

    def groups(ps):
        return [{"params": ps[:1], "lr": 3e-2, "weight_decay": 0.0}, {"params": ps[1:], "betas": (0.8, 0.99)}]

    shapes = [(33, 17), (65,)]
    ours, _ = run(lambda ps: AdamW(groups(ps), lr=1e-2), shapes, torch.float32, 3, 20)
    theirs, _ = run(lambda ps: bnb.optim.AdamW(groups(ps), lr=1e-2), shapes, torch.float32, 3, 20)
    assert all(rel_err(a, b) <= 1e-6 for a, b in zip(ours, theirs))
    plain, _ = run(lambda ps: AdamW(ps, lr=1e-2), shapes, torch.float32, 3, 20)
    assert not torch.equal(plain[0], ours[0]) and not torch.equal(plain[1], ours[1])


def test_sqrt_rn_is_correctly_rounded():
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    x = torch.cat([torch.rand(100_003, generator=g) * 10.0 ** torch.randint(-30, 30, (100_003,), generator=g),
                   torch.tensor([0.0, 1e-45, 2.0**-126, 1.0, 4.0, 3.4e38])])  # fmt: skip
    want = torch.from_numpy(np.sqrt(x.numpy()))  # numpy's float32 sqrt is the IEEE instruction
    assert torch.equal(sqrt_rn(x), want)


def test_update_is_independent_of_chunking_and_threads():
    """Whole tensor with 2 threads (torch splits it mid-way) == chunks with 1 thread: what lets the
    pager update page by page and still match the unpaged optimizer."""
    n = 70_001
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    p, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
    m, v = torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) * 0.01
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=7)
    whole = [t.clone() for t in (p, m, v)]
    torch.set_num_threads(2)
    adamw_update_32bit(whole[0], grad, whole[1], whole[2], **hyper)
    torch.set_num_threads(1)
    chunked = [t.clone() for t in (p, m, v)]
    for start in range(0, n, 4096):
        end = min(n, start + 4096)
        adamw_update_32bit(*(t[start:end] for t in (chunked[0], grad, chunked[1], chunked[2])), **hyper)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


def test_defaults_zero_grad_and_min_8bit_size():
    small, big = torch.nn.Parameter(torch.randn(4095)), torch.nn.Parameter(torch.randn(4096))
    opt = AdamW8bit([small, big])
    assert opt.defaults == dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    small.grad, big.grad = torch.randn(4095), torch.randn(4096)
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert small.grad is None and big.grad is None
    state = opt.state_dict()["state"]
    assert flat(state[0])["state1"].dtype == torch.float32 and flat(state[1])["state1"].dtype == torch.uint8


# -- the pager alone ----------------------------------------------------------------------------
@settings(max_examples=30)
@given(
    capacity=st.integers(1, 4),
    ops=st.lists(st.tuples(st.sampled_from(["touch", "prefetch", "read", "write"]), st.integers(0, 5)), max_size=60),
)
def test_pager_keeps_every_byte_and_the_budget(capacity, ops):
    page_bytes = 64
    pool = PagePool("cpu", capacity * page_bytes + page_bytes // 2, page_bytes)
    pids = [pool.new_page() for _ in range(6)]
    shadow = {pid: torch.zeros(page_bytes, dtype=torch.uint8) for pid in pids}
    recency = []  # page ids by last acquire, least recent first
    rng = torch.Generator().manual_seed(len(ops))
    for op, pid in ops:
        if op == "touch":
            before = pool.resident_pages
            slot = pool.acquire(pid)
            assert torch.equal(slot, shadow[pid]), "stale or lost page contents"
            if pid not in before and len(before) == capacity:  # an eviction happened: the LRU page went
                (evicted,) = set(before) - set(pool.resident_pages)
                assert evicted == before[0]
            new = torch.randint(0, 256, (page_bytes,), dtype=torch.uint8, generator=rng)
            slot.copy_(new)
            shadow[pid] = new
            pool.release(pid)
            assert pool.resident_pages[-1] == pid
        elif op == "prefetch":
            pool.prefetch(pid)
        elif op == "read":
            assert torch.equal(pool.read(pid), shadow[pid])
        else:
            new = torch.randint(0, 256, (page_bytes,), dtype=torch.uint8, generator=rng)
            pool.write(pid, new)
            shadow[pid] = new
        assert pool.resident_bytes <= pool.budget_bytes
    for pid in pids:
        assert torch.equal(pool.read(pid), shadow[pid])
    assert pool.stats.pages_out >= pool.stats.pages_in - len(pids)


def test_budget_set_late_applies_to_every_page_in():
    pool = PagePool("cpu", None, 64)
    pids = [pool.new_page() for _ in range(4)]
    pool.set_budget(128)
    for pid in pids:
        pool.acquire(pid)
        pool.release(pid)
    assert pool.resident_pages == pids[2:] and pool.stats.pages_out == 2
    with pytest.raises(RuntimeError, match="no page is resident"):
        pool.set_budget(256)
    with pytest.raises(ValueError, match="smaller than one page"):
        PagePool("cpu", None, 64).set_budget(32)


def test_budget_smaller_than_a_page_is_rejected():
    with pytest.raises(ValueError, match="smaller than one page"):
        PagePool("cpu", 1000, 4096)
    with pytest.raises(ValueError, match="smaller than one page"):
        PagedAdamW([torch.nn.Parameter(torch.zeros(3))], device_budget_bytes=4095, page_bytes=4096)
    with pytest.raises(ValueError, match="page_bytes must be at least"):
        PagedAdamW([torch.nn.Parameter(torch.zeros(3))], page_bytes=1024)


def test_layout_chunks_are_whole_quantization_blocks():
    for bits in (8, 32):
        layout = StateLayout(bits, 10_000)
        assert layout.chunk % 256 == 0 and layout.chunk > 0
        page = torch.zeros(10_000, dtype=torch.uint8)
        whole = layout.views(page, 0, layout.chunk)
        assert sum(v.numel() * v.element_size() for v in whole.values()) <= 10_000
        for key, view in layout.views(page, 256, layout.chunk - 256).items():  # a segment: a suffix
            assert view.data_ptr() + view.numel() * view.element_size() == (
                whole[key].data_ptr() + whole[key].numel() * whole[key].element_size()
            ), key


# -- paged == unpaged ---------------------------------------------------------------------------
@pytest.mark.parametrize("paged_cls,plain_cls", [(PagedAdamW, AdamW), (PagedAdamW8bit, AdamW8bit)])
def test_paged_equals_unpaged_under_forced_eviction(monkeypatch, paged_cls, plain_cls):
    shapes = [(64, 129), (5000,), (33, 17), (4097,)]
    page_bytes = 4096
    eight_bit = paged_cls is PagedAdamW8bit
    space = {8: 0, 32: 0}  # elements of each state space: parameters start at multiples of 256
    for shape in shapes:
        numel = torch.Size(shape).numel()
        space[8 if eight_bit and numel >= 4096 else 32] += -(-numel // 256) * 256
    n_pages = sum(-(-size // StateLayout(bits, page_bytes).chunk) for bits, size in space.items())
    budget = n_pages * page_bytes // 4
    checked = []
    real_page_in = PagePool._page_in

    def page_in_within_budget(self, pid, slot):
        real_page_in(self, pid, slot)
        assert self.resident_bytes <= self.budget_bytes, f"{self.resident_bytes} > {self.budget_bytes}"
        checked.append(pid)

    monkeypatch.setattr(PagePool, "_page_in", page_in_within_budget)
    hyper = dict(lr=3e-3, weight_decay=0.05)
    paged, opt = run(
        lambda ps: paged_cls(ps, device_budget_bytes=budget, page_bytes=page_bytes, **hyper),
        shapes, torch.float32, 11, 50,
    )  # fmt: skip
    plain, _ = run(lambda ps: plain_cls(ps, **hyper), shapes, torch.float32, 11, 50)
    for a, b in zip(paged, plain):
        assert torch.equal(a, b), f"{tuple(a.shape)}: rel {rel_err(a, b):.2e}"
    stats = opt.pager_stats
    assert n_pages == sum(len(space["pages"]) for space in opt._spaces.values())
    capacity = budget // page_bytes
    assert capacity < n_pages, "the budget must force eviction"
    # Alternating sweeps: each step after the first misses the pages the previous one evicted.
    assert stats.pages_in == 49 * (n_pages - capacity)
    assert stats.peak_resident_bytes <= budget and len(checked) >= stats.pages_in


@settings(max_examples=12)
@given(
    shapes=st.lists(st.sampled_from([(1,), (255,), (257,), (300, 20), (4096,), (4099,), (2, 3000)]), min_size=1,
                    max_size=5),
    eight_bit=st.booleans(),
    page_bytes=st.sampled_from([2048, 4096, 10_000]),
    budget_pages=st.integers(1, 4),
)  # fmt: skip
def test_paged_equals_unpaged_for_any_layout(shapes, eight_bit, page_bytes, budget_pages):
    paged_cls, plain_cls = (PagedAdamW8bit, AdamW8bit) if eight_bit else (PagedAdamW, AdamW)
    budget = budget_pages * page_bytes
    paged, opt = run(lambda ps: paged_cls(ps, lr=1e-2, device_budget_bytes=budget, page_bytes=page_bytes),
                     shapes, torch.float32, 5, 6)  # fmt: skip
    plain, plain_opt = run(lambda ps: plain_cls(ps, lr=1e-2), shapes, torch.float32, 5, 6)
    assert all(torch.equal(a, b) for a, b in zip(paged, plain))
    assert opt.pager_stats.peak_resident_bytes <= budget
    got, want = opt.state_dict(), plain_opt.state_dict()
    assert got["param_groups"] == want["param_groups"] and got["state"].keys() == want["state"].keys()
    for i, entry in want["state"].items():
        assert got["state"][i].keys() == entry.keys()
        for key, value in flat(entry).items():
            mine = flat(got["state"][i])[key]
            assert torch.equal(mine, value) if torch.is_tensor(value) else mine == value


def test_lr_scheduler_drives_the_paged_optimizer():
    params, opt = run(lambda ps: PagedAdamW(ps, lr=1e-2, page_bytes=4096), [(33, 17)], torch.float32, 4, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    for _ in range(3):
        params[0].grad = torch.randn(33, 17)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 1e-2 * 0.5**3
    saved = opt.state_dict()
    assert saved["param_groups"][0]["initial_lr"] == 1e-2
    fresh = PagedAdamW([torch.nn.Parameter(params[0].detach().clone())], lr=1.0, page_bytes=4096)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["lr"] == 1e-2 * 0.5**3


def test_paged_idle_when_the_budget_holds_everything():
    shapes = [(64, 129)] + [(7,)] * 5  # small tensors share a page: 8448 + 5 * 256 elements, 512 a page
    params, opt = run(lambda ps: PagedAdamW(ps, page_bytes=4096), shapes, torch.float32, 5, 5)
    assert opt.pager_stats.pages_in == 0 and opt.pager_stats.pages_out == 0
    assert opt.pager_stats.peak_resident_bytes == 19 * 4096


# -- resume -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit])
def test_resume_is_bit_identical(cls):
    shapes = [(64, 129), (33, 17)]
    kwargs = dict(lr=5e-3, device_budget_bytes=8192, page_bytes=4096) if cls.__name__.startswith("Paged") else {}
    g = torch.Generator().manual_seed(7)
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(40)]

    def steps(params, opt, rng):
        for grad_set in grads[rng.start : rng.stop]:
            for p, grad in zip(params, grad_set):
                p.grad = grad.clone()
            opt.step()

    straight = make_params(shapes, torch.float32, 1)
    opt = cls(straight, **kwargs)
    steps(straight, opt, range(0, 40))

    first = make_params(shapes, torch.float32, 1)
    opt1 = cls(first, **kwargs)
    steps(first, opt1, range(0, 20))
    buffer = io.BytesIO()
    torch.save(opt1.state_dict(), buffer)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = cls(resumed, **kwargs)
    opt2.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    steps(resumed, opt2, range(20, 40))
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)
    saved, want = opt2.state_dict()["state"], opt.state_dict()["state"]
    for i in want:
        assert saved[i].keys() == want[i].keys() and flat(saved[i]).keys() == flat(want[i]).keys()
        for key, value in flat(want[i]).items():
            got = flat(saved[i])[key]
            assert torch.equal(got, value) if torch.is_tensor(value) else got == value


def test_paged_and_unpaged_state_dicts_are_interchangeable():
    params, opt = run(lambda ps: AdamW8bit(ps), [(64, 129)], torch.float32, 2, 3)
    paged = PagedAdamW8bit([torch.nn.Parameter(p.detach().clone()) for p in params], page_bytes=4096,
                           device_budget_bytes=4096)  # fmt: skip
    paged.load_state_dict(opt.state_dict())
    for key, value in flat(opt.state_dict()["state"][0]).items():
        got = flat(paged.state_dict()["state"][0])[key]
        assert torch.equal(got, value) if torch.is_tensor(value) else got == value


@pytest.mark.bnb
@pytest.mark.parametrize("name", ["AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "Adam8bit"])
def test_state_dicts_move_between_fourbit_and_bitsandbytes(name):
    """Three steps in one library, its state_dict loaded into the other's optimizer: the states arrive
    as they were (bitsandbytes' layout, tensors shaped like the parameter), and three more steps
    there land where the first library's own next three steps land (32-bit: within 1e-6; 8-bit:
    bitsandbytes' CPU quantizer rounds a few codes differently, test_optim8bit.py, so within 1e-3)."""
    import bitsandbytes as bnb

    import fourbit.optim as fopt

    shapes = [(64, 129), (33, 17)]  # 8-bit optimizers keep the small one in float32 (min_8bit_size)
    g = torch.Generator().manual_seed(3)
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(6)]
    tol = 1e-3 if "8bit" in name else 1e-6

    def steps(params, opt, which):
        for grad_set in grads[which]:
            for p, grad in zip(params, grad_set):
                p.grad = grad.clone()
            opt.step()

    for first, second in ((getattr(fopt, name), getattr(bnb.optim, name)), (getattr(bnb.optim, name), getattr(fopt, name))):
        params = make_params(shapes, torch.float32, 5)
        opt = first(params, lr=1e-2)
        steps(params, opt, slice(0, 3))
        saved = copy_of(opt.state_dict())
        moved = [torch.nn.Parameter(p.detach().clone()) for p in params]
        other = second(moved, lr=1e-2)
        other.load_state_dict(saved)
        for i, p in enumerate(moved):  # the states arrived unchanged
            mine = flat(saved["state"][i])
            got = other.state[p] if second.__module__.startswith("bitsandbytes") else flat(other.state_dict()["state"][i])
            assert int(got["step"]) == 3
            for key in ("state1", "state2", "absmax1", "absmax2"):
                if key in mine:
                    assert got[key].shape == mine[key].shape and torch.equal(got[key], mine[key]), (key, first, second)
        steps(params, opt, slice(3, 6))
        steps(moved, other, slice(3, 6))
        for a, b in zip(moved, params):
            assert rel_err(a.detach(), b.detach()) < tol, (first, second)


def copy_of(state_dict: dict) -> dict:
    """What a checkpoint file gives back: torch.save then torch.load."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()))


@pytest.mark.bnb
def test_adam_aliases_are_bitsandbytes_adam_with_decoupled_weight_decay():
    """bitsandbytes' Adam applies weight decay decoupled, like AdamW (not torch.optim.Adam's L2 on
    the gradient): fourbit's Adam follows it, and differs from torch's Adam when weight_decay > 0."""
    import bitsandbytes as bnb

    import fourbit.optim as fopt

    hyper = dict(lr=1e-2, weight_decay=0.1)
    ours, _ = run(lambda ps: fopt.Adam(ps, **hyper), [(64, 129)], torch.float32, 4, 20)
    theirs, _ = run(lambda ps: bnb.optim.Adam(ps, **hyper), [(64, 129)], torch.float32, 4, 20)
    decoupled, _ = run(lambda ps: torch.optim.AdamW(ps, **hyper), [(64, 129)], torch.float32, 4, 20)
    coupled, _ = run(lambda ps: torch.optim.Adam(ps, **hyper), [(64, 129)], torch.float32, 4, 20)
    assert rel_err(ours[0].detach(), theirs[0].detach()) < 1e-6 and rel_err(ours[0].detach(), decoupled[0].detach()) < 1e-6
    assert rel_err(ours[0].detach(), coupled[0].detach()) > 1e-3
    p = [torch.nn.Parameter(torch.zeros(5000))]
    for n in ("Adam", "Adam8bit", "Adam32bit", "PagedAdam", "PagedAdam8bit", "PagedAdam32bit", "AdamW32bit", "PagedAdamW32bit"):
        opt, ref = getattr(fopt, n)(p), getattr(bnb.optim, n)(p)
        bits = 8 if "8bit" in n else 32
        assert (opt.optim_bits, opt.paged) == (bits, n.startswith("Paged")), n
        assert opt.defaults["weight_decay"] == ref.defaults["weight_decay"], n
    with pytest.raises(ValueError, match="leave optim_bits at 32"):
        fopt.Adam32bit(p, optim_bits=8)


# -- bad input ----------------------------------------------------------------------------------
def test_sparse_gradient_is_an_error():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        AdamW(emb.parameters()).step()


@pytest.mark.parametrize("cls", [AdamW, PagedAdamW8bit])
def test_nonfinite_gradient_skips_that_tensor(cls):
    bad, good = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(300))
    opt = cls([bad, good], page_bytes=4096) if cls is PagedAdamW8bit else cls([bad, good])
    bad.grad, good.grad = torch.randn(5000), torch.randn(300)
    opt.step()
    before_bad, before_good = bad.detach().clone(), good.detach().clone()
    state_before = flat(opt.state_dict()["state"][0])
    bad.grad[17] = float("nan")
    bad.grad[4000] = float("inf")
    good.grad = torch.randn(300)
    with pytest.warns(RuntimeWarning, match="NaN or inf"):
        opt.step()
    assert torch.equal(bad, before_bad) and not torch.equal(good, before_good)
    state_after = flat(opt.state_dict()["state"][0])
    assert state_after["step"] == 1 and state_after["nonfinite_skips"] == 1 and opt.nonfinite_skips == 1
    assert torch.equal(state_after["state1"], state_before["state1"])
    assert opt.state_dict()["state"][1]["step"] == 2
    strict = cls([bad], nonfinite="raise")
    with pytest.raises(FloatingPointError, match="non-finite"):
        strict.step()


def test_foreign_or_mismatched_state_dicts_are_rejected():
    p = torch.nn.Parameter(torch.randn(64, 129))
    p.grad = torch.randn(64, 129)
    eight = AdamW8bit([p])
    eight.step()
    with pytest.raises(ValueError, match="8-bit states"):
        AdamW([p]).load_state_dict(eight.state_dict())
    torch_opt = torch.optim.AdamW([p])
    torch_opt.step()
    with pytest.raises(ValueError, match="not a fourbit AdamW state dict .nor a bitsandbytes one.: parameter 0 holds"):
        AdamW([p]).load_state_dict(torch_opt.state_dict())
    other = torch.nn.Parameter(torch.randn(64, 130))
    with pytest.raises(ValueError, match="64, 130"):
        AdamW8bit([other]).load_state_dict(eight.state_dict())
    with pytest.raises(ValueError, match="parameter groups"):
        AdamW8bit([{"params": [p]}, {"params": [other]}]).load_state_dict(eight.state_dict())


def test_bad_hyperparameters_are_rejected():
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="betas"):
        AdamW(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="amsgrad"):
        AdamW(p, amsgrad=True)
    with pytest.raises(ValueError, match="leave optim_bits at 32"):
        AdamW8bit(p, optim_bits=8)
    with pytest.raises(ValueError, match="nonfinite"):
        AdamW(p, nonfinite="zero")
    with pytest.raises(ValueError, match="optim_bits must be 8 or 32"):
        AdamW(p, optim_bits=4)


# -- bitsandbytes' live state layout and GlobalOptimManager ---------------------------------------
@pytest.fixture
def manager():
    from fourbit.optim import GlobalOptimManager

    mng = GlobalOptimManager.get_instance()
    mng.initialize()
    yield mng
    mng.initialize()


@pytest.mark.parametrize("cls", [AdamW, AdamW8bit])
def test_live_state_is_parameter_shaped_and_edits_take_effect(cls):
    """optimizer.state[p] as bitsandbytes lays it out; code that edits a moment changes the next step."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(96, 64))
    twin = torch.nn.Parameter(p.detach().clone())
    opts = [cls([p]), cls([twin])]
    for q, opt in zip((p, twin), opts):
        q.grad = torch.full_like(q, 0.01)
        opt.step()
    state = opts[0].state[p]
    assert state["state1"].shape == p.shape and state["state2"].shape == p.shape
    if cls is AdamW8bit:
        assert state["state1"].dtype == torch.uint8 and state["absmax1"].shape == (24,)
        assert state["qmap1"].shape == (256,) and state["qmap2"].shape == (256,)
        state["absmax1"].zero_()  # research code resetting the first moment
    else:
        state["state1"].zero_()
    for q, opt in zip((p, twin), opts):
        q.grad = torch.full_like(q, 0.01)
        opt.step()
    assert not torch.equal(p, twin)
    saved = opts[0].state_dict()["state"][0][WRAPPED]
    assert torch.equal(saved["state1"], state["state1"])


def test_override_config_gives_per_parameter_bits_and_hyperparameters(manager):
    """lr / betas / eps / weight_decay overrides equal a param group with those settings."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(64, 80)), torch.nn.Parameter(torch.randn(64, 80))
    a2, b2 = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
    manager.override_config(b, key_value_dict={"lr": 3e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1})
    manager.override_config(a, "optim_bits", 8)
    with_overrides = AdamW([a, b], lr=1e-3)  # overrides are keyed by tensor: a2, b2 have none
    groups = AdamW8bit([{"params": [a2]}]), AdamW([{"params": [b2], "lr": 3e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}])
    for _ in range(3):
        for p, twin in ((a, a2), (b, b2)):
            p.grad = torch.randn(p.shape)
            twin.grad = p.grad.clone()
        with_overrides.step()
        for opt in groups:
            opt.step()
    assert with_overrides.state[a]["state1"].dtype == torch.uint8
    assert torch.equal(a, a2) and torch.equal(b, b2)


def test_register_module_override_and_positions_survive_new_tensors(manager):
    layer = torch.nn.Linear(80, 64)
    manager.register_module_override(layer, "weight", {"optim_bits": 8})
    opt = AdamW(layer.parameters())
    for p in layer.parameters():
        p.grad = torch.randn(p.shape)
    opt.step()
    assert opt.state[layer.weight]["state1"].dtype == torch.uint8 and opt.state[layer.bias]["state1"].dtype == torch.float32
    manager.initialize()
    cpu = [torch.randn(64, 80), torch.randn(64, 80)]
    manager.override_config(cpu[1], "optim_bits", 8)
    manager.register_parameters(cpu)
    moved = [torch.nn.Parameter(t.clone()) for t in cpu]  # new tensors (as .cuda() makes): found by position
    opt = AdamW(moved)
    for p in moved:
        p.grad = torch.randn(p.shape)
    opt.step()
    assert opt.state[moved[0]]["state1"].dtype == torch.float32 and opt.state[moved[1]]["state1"].dtype == torch.uint8


def test_settings_fourbit_does_not_implement_raise(manager):
    p = torch.nn.Parameter(torch.randn(64, 80))
    with pytest.raises(ValueError, match="no setting .'amsgrad'."):
        manager.override_config(p, "amsgrad", True)
    manager.override_config(p, "max_unorm", 1.0)
    opt = AdamW([p])
    p.grad = torch.randn(p.shape)
    with pytest.raises(ValueError, match="max_unorm=1.0 is set for a parameter of shape .64, 80.; fourbit's"):
        opt.step()
    with pytest.raises(ValueError, match="needs a value"):
        manager.override_config(p, "lr")
    manager.initialize()
    args = type("Args", (), {"optim_bits": 8, "min_8bit_size": 16, "max_unorm": 0.0, "skip_zeros": True})()
    with pytest.raises(ValueError, match="skip_zeros=True"):
        AdamW([p], args=args)
    args.skip_zeros = False
    opt = AdamW([p], args=args)  # bitsandbytes' args object replaces optim_bits / min_8bit_size
    opt.step()
    assert opt.state[p]["state1"].dtype == torch.uint8


# -- benchmark smoke ----------------------------------------------------------------------------
@pytest.mark.bnb
def test_bench_optim_smoke(tmp_path):
    import json

    from benchmarks import bench_optim

    assert bench_optim.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "optim.json").read_text())
    assert {r["op"] for r in rows} == {"adamw32 step", "adamw8 step"}
    assert {"fourbit", "fourbit-paged-idle", "fourbit-paged-25%", "bitsandbytes"} <= {r["provider"] for r in rows}
    paged = [r for r in rows if r["provider"] == "fourbit-paged-25%"]
    assert all(r["page_bytes_in_per_step"] > 0 and r["peak_mem_bytes"] <= r["config"]["budget_bytes"] for r in paged)
    assert "vs bitsandbytes" in (tmp_path / "optim.md").read_text()
