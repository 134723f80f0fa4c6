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


_SESSION_CACHE = None


def cache_with_builtin(path) -> str:
    """A fresh cache folder (for tests of the cache itself) that still holds the session's stand-in
    for the built-in pretrained CLIP."""
    path.mkdir(parents=True, exist_ok=True)
    link = path / "pretrained"
    if not link.exists():
        link.symlink_to(_SESSION_CACHE / "pretrained", target_is_directory=True)
    return str(path)


# Settings of a pretraining small enough for the tests (seconds, not minutes).
TINY_PRETRAIN = dict(corpus_size=96, steps=6, batch_size=16, warmup=1)


@pytest.fixture(scope="session", autouse=True)
def _test_cache(tmp_path_factory):
    """Keep every test (and the subprocesses they start) out of the user's cache, and stand in for the
    built-in pretrained CLIP with a few steps of the same pretraining stored under the default
    settings' key, so that runs on the built-in suite load it instead of training for minutes."""
    import os

    from fastmerge import pretrain

    global _SESSION_CACHE
    cache = _SESSION_CACHE = tmp_path_factory.mktemp("fastmerge-cache")
    old = os.environ.get("FASTMERGE_CACHE")
    os.environ["FASTMERGE_CACHE"] = str(cache)
    from dataclasses import replace

    model, record = pretrain.pretrain(replace(pretrain.DEFAULT, **TINY_PRETRAIN), log=lambda _m: None, progress=False)
    pretrain.save_checkpoint(model, dict(record, stand_in=True), pretrain.checkpoint_path())
    yield cache
    if old is None:
        os.environ.pop("FASTMERGE_CACHE", None)
    else:
        os.environ["FASTMERGE_CACHE"] = old


# significand bits (the implicit one included): rounding to the dtype moves a value by at most
# |x| * 2^-P (half a unit in the last place), down to the subnormals, where half a step is TINY
P = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24, torch.float64: 53}
TINY = {torch.bfloat16: 2.0 ** -134, torch.float16: 2.0 ** -25, torch.float32: 2.0 ** -150, torch.float64: 0.0}


def assert_rounded_from(out, exact, mag, terms):
    """``out`` is ``exact`` (float64) rounded to ``out.dtype`` after ``terms`` roundings in the
    accumulation type (float32, or float64 for float64 inputs) of values of size up to ``mag``: within
    half a unit in the last place of the output plus what the accumulation can add."""
    u = 2.0 ** -53 if out.dtype == torch.float64 else 2.0 ** -24
    acc_err = terms * u * mag
    tol = (exact.abs() + acc_err) * 2.0 ** -P[out.dtype] + acc_err + TINY[out.dtype]
    err = (out.double() - exact).abs()
    i = int((err - tol).argmax())
    assert bool((err <= tol).all()), f"error {float(err[i]):.3g} above its bound {float(tol[i]):.3g} at index {i}"
