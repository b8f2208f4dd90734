"""Test configuration. Before anything imports triton (bitsandbytes does, at import), pick the Triton
mode for this process: with no CUDA device the kernels run in Triton's CPU interpreter. Triton fixes
interpreted-or-compiled at its first import, so this has to happen here, not in a test module."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=40,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, max_examples=10)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
