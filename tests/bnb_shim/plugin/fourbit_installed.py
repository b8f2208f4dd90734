"""pytest plugin: run a test session under the real bitsandbytes with fourbit installed into it.

Loaded by run_bnb_tests.py (`--against installed`) with `-p fourbit_installed`; configured by
environment variables so that the test files themselves stay unchanged:

    FOURBIT_BNB_OPTIM=1         bitsandbytes' Adam/AdamW optimizer classes (8-bit, 32-bit, paged) and
                                GlobalOptimManager are fourbit's, before any test module is imported
    FOURBIT_BNB_AVX512BF16=1    bitsandbytes believes the CPU has AVX512-BF16 (`has_avx512bf16()` is
                                True): its tests and Linear4bit repack 4-bit weights for that kernel

Every test counts its calls into fourbit (the functions install() routes to, and the optimizer
update steps) and records them as the junit property `fourbit_calls`, so the runner can tell a
test that passed on fourbit's code from one that never reached it.
"""

from __future__ import annotations

import collections
import os

import pytest

_CALLS: collections.Counter = collections.Counter()
_PATCH = pytest.MonkeyPatch()  # every change this plugin makes, undone at unconfigure

# bitsandbytes.optim name -> fourbit.optim name
OPTIMIZERS = ("Adam", "Adam8bit", "Adam32bit", "AdamW", "AdamW8bit", "AdamW32bit", "PagedAdam", "PagedAdam8bit",
              "PagedAdam32bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "GlobalOptimManager")


def _count(module, name: str) -> None:
    real = getattr(module, name)

    def counted(*args, **kwargs):
        _CALLS[name] += 1
        return real(*args, **kwargs)

    _PATCH.setattr(module, name, counted)


def pytest_configure(config):
    import bitsandbytes
    import bitsandbytes.functional
    import bitsandbytes.nn.modules

    from fourbit import dispatch
    from fourbit.integrations import bitsandbytes as fourbit_bnb

    # fourbit.dispatch is where every route into fourbit passes (the CPU kernels or the reference)
    for name in ("quantize", "dequantize", "matmul", "adamw_update_32bit", "adamw_update_8bit",
                 "quantize_blockwise", "dequantize_blockwise"):
        _count(dispatch, name)
    fourbit_bnb.install()
    if os.environ.get("FOURBIT_BNB_OPTIM") == "1":
        import fourbit.optim

        for name in OPTIMIZERS:
            _PATCH.setattr(bitsandbytes.optim, name, getattr(fourbit.optim, name))
    if os.environ.get("FOURBIT_BNB_AVX512BF16") == "1":
        for module in (bitsandbytes.functional, bitsandbytes.nn.modules):
            _PATCH.setattr(module, "has_avx512bf16", lambda: True)


def pytest_unconfigure(config):
    from fourbit.integrations import bitsandbytes as fourbit_bnb

    fourbit_bnb.uninstall()
    _PATCH.undo()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _CALLS.clear()
    yield


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item, nextitem):
    # before the teardown report is made: junit writes that report's user_properties
    item.user_properties.append(("fourbit_calls", sum(_CALLS.values())))
