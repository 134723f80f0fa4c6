"""Shared helpers for the fastmerge tests: awkward sizes, dtypes with their tolerances, data makers."""

from __future__ import annotations

import pytest
import torch

# sizes 1, 2, primes, 2^k ± 1, and a few that cross the kernels' chunk (512) and item (65536) sizes
AWKWARD_SIZES = [1, 2, 3, 7, 31, 127, 255, 257, 511, 513, 1021, 4099, 65535, 65537, 131073]
SMALL_SIZES = [1, 2, 5, 17, 127, 257, 1021]

# (dtype, rtol, atol) for floating results that are not compared bit for bit
DTYPES = [
    (torch.float32, 1e-6, 1e-6),
    (torch.bfloat16, 1e-2, 1e-2),
    (torch.float16, 1e-3, 1e-3),
]


def make_tasks(d: int, T: int, dtype=torch.float32, seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(d, generator=g) * 0.05).to(dtype)
    thetas = [(base.float() + scale * torch.randn(d, generator=g) * 0.01).to(dtype) for _ in range(T)]
    return base, thetas


def strided(x: torch.Tensor, step: int = 2) -> torch.Tensor:
    """The same values as ``x`` in a non-contiguous 1-D view."""
    buf = torch.zeros(x.numel() * step, dtype=x.dtype)
    buf[::step] = x
    return buf[::step]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
