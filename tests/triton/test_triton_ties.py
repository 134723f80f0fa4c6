"""merge_ties on the Triton backend against the reference, bit for bit.

Runs on CPU tensors under TRITON_INTERPRET=1 (small sizes: the interpreter is slow) and on CUDA
tensors where a GPU is present. The module constants of ``fastmerge.kernels.merge_ties`` are
shrunk in some tests so that small inputs take every path of the algorithm: sampled brackets with
candidates and fix-ups, a missed bracket with its exact fallback, and an overflowing list of
cancelled positions.
"""

from __future__ import annotations

import pytest
import torch

import fastmerge
from fastmerge import reference as ref
from conftest import make_tasks, strided

MODES = ["mean", "sum", "max"]


@pytest.fixture
def mt():
    import importlib

    return importlib.import_module("fastmerge.kernels.merge_ties")  # the module, not the function


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1).view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def check(device, base, thetas, **kw):
    """Triton on ``device`` against the reference on CPU, bit for bit (zero signs included)."""
    on = [t.to(device) for t in thetas] if isinstance(thetas, list) else thetas.to(device)
    kw_dev = dict(kw)
    out = fastmerge.merge_ties(base.to(device), on, backend="triton", **kw_dev)
    expect = ref.merge_ties(base.cpu(), [t.cpu() for t in thetas] if isinstance(thetas, list) else thetas.cpu(), **kw)
    assert out.dtype == expect.dtype and out.shape == expect.shape
    assert torch.equal(bits(out.cpu()), bits(expect)), kw
    return out


@pytest.fixture
def small_sample(mt, monkeypatch):
    """Force sampled brackets (with candidates) even on inputs of a few thousand entries."""
    monkeypatch.setattr(mt, "SAMPLE_MAX", 64)
    monkeypatch.setattr(mt, "SAMPLE_MAX_TENSOR", 32)
    return mt


@pytest.mark.parametrize("d", [1, 2, 3, 7, 31, 127, 255, 257, 1021, 4099])
def test_sizes(device, d):
    base, thetas = make_tasks(d, 3, seed=d)
    check(device, base, thetas, density=0.2)


@pytest.mark.parametrize("merge", MODES)
@pytest.mark.parametrize("density", [1.0, 0.5, 0.2, 0.01, 1e-6])
def test_modes_and_densities_whole_sample(device, merge, density):
    base, thetas = make_tasks(1001, 4, seed=5)
    check(device, base, thetas, density=density, merge=merge, lam=0.8)


@pytest.mark.parametrize("merge", MODES)
@pytest.mark.parametrize("density", [0.9, 0.2, 0.01])
@pytest.mark.parametrize("T", [1, 3, 8])
def test_bracket_path(device, small_sample, merge, density, T):
    base, thetas = make_tasks(3001, T, seed=T)
    check(device, base, thetas, density=density, merge=merge, lam=1.3)
    st = small_sample.last_stats()
    assert st["path"] in ("bracket", "bracket-missed")
    if density < 1:
        assert st["sample"] == 64


def test_many_tasks_unpacked_counters(device, small_sample):
    # T > 12 tasks do not fit the packed 5-bit per-task counters: the per-task reductions run instead
    base, thetas = make_tasks(2001, 13, seed=13)
    for merge in MODES:
        check(device, base, thetas, density=0.2, merge=merge)
    assert small_sample.last_stats()["path"] == "bracket"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("merge", MODES)
def test_dtypes(device, small_sample, dtype, merge):
    base, thetas = make_tasks(2053, 5, dtype=dtype, seed=11)
    check(device, base, thetas, density=0.3, merge=merge, lam=1.3)


def test_weights(device, small_sample):
    base, thetas = make_tasks(2049, 4, seed=3)
    check(device, base, thetas, density=0.25, weights=[0.5, 2.0, 1.0, 3.0])
    check(device, base, thetas, density=0.25, weights=[0.5, 2.0, 1.0, 3.0], merge="max")


def test_scope_tensor(device, small_sample):
    d = 3000
    base, thetas = make_tasks(d, 3, seed=9)
    layout = [0, 1, 1, 10, 1000, 1001, 2047, 3000]  # sizes 1, 0, 9, 990, 1, 1046, 953
    for merge in MODES:
        check(device, base, thetas, density=0.3, merge=merge, scope="tensor", layout=layout)


def test_ties_at_the_threshold_are_all_kept(device, small_sample):
    base = torch.zeros(1000)
    x = torch.tensor([1.0, -1.0, 0.5, 2.0] * 250)
    y = torch.tensor([-1.0, 1.0, 1.0, 1.0] * 250)
    for merge in MODES:
        check(device, base, [x, y], density=0.3, merge=merge)


def test_exact_cancellations_take_the_majority_sign(device, small_sample):
    g = torch.Generator().manual_seed(0)
    d = 2000
    base = torch.zeros(d)
    a = torch.randint(1, 5, (d,), generator=g).float()
    # task 1 cancels task 0 on the first half exactly; the second half decides the majority
    b = torch.where(torch.arange(d) < d // 2, -a, a * 0.5)
    c = torch.randn(d, generator=g) * 0.01
    for merge in MODES:
        check(device, base, [a, b, c], density=0.9, merge=merge)
        check(device, base, [a, b, -c], density=0.9, merge=merge)


def test_zero_task_and_signed_zeros(device, small_sample):
    base, thetas = make_tasks(1500, 3, seed=2)
    thetas[1] = base.clone()  # an all-zero task vector
    thetas[2] = thetas[2].clone()
    thetas[2][::3] = base[::3]
    base = base.clone()
    base[::7] = -0.0
    thetas[0][::5] = -0.0
    for merge in MODES:
        check(device, base, thetas, density=0.2, merge=merge)
    check(device, torch.zeros(100), [torch.zeros(100), -torch.zeros(100)], density=0.5)
    # base -0 where nothing is kept, with a negative majority: the max merge gives -0 (0 * majority)
    nb = torch.full((64,), -0.0)
    xa = torch.zeros(64)
    xa[:40] = -1.0
    xa[40:44] = 2.0
    for merge in MODES:
        check(device, nb, [xa, xa * 0.5], density=0.5, merge=merge)
        check(device, nb, [xa, xa * 0.5], density=0.5, merge=merge, lam=-1.0)


def test_non_contiguous_and_stacked(device, small_sample):
    base, thetas = make_tasks(1025, 3, seed=4)
    check(device, strided(base), [strided(t) for t in thetas], density=0.2)
    check(device, base, torch.stack(thetas), density=0.2)


def test_missed_bracket_falls_back_exactly(device, mt, monkeypatch):
    monkeypatch.setattr(mt, "SAMPLE_MAX", 16)
    monkeypatch.setattr(mt, "Z", -3.0)  # an inverted bracket: the threshold cannot be inside
    base, thetas = make_tasks(3001, 3, seed=1)
    check(device, base, thetas, density=0.2)
    assert mt.last_stats()["path"] == "bracket-missed"


def test_two_pass_strategy(device, mt, monkeypatch):
    monkeypatch.setenv("FASTMERGE_TIES_STRATEGY", "two-pass")
    base, thetas = make_tasks(2001, 4, seed=6)
    for merge in MODES:
        check(device, base, thetas, density=0.2, merge=merge)
        assert mt.last_stats()["path"] == "exact"
    check(device, base, thetas, density=0.2, scope="tensor", layout=[0, 5, 1000, 2001])


def test_cancel_list_overflow_runs_a_recovery_pass(device, mt, monkeypatch):
    monkeypatch.setattr(mt, "CANCEL_CAP_MIN", 0)  # capacity d // 64
    d = 1280
    base = torch.zeros(d)
    a = torch.ones(d)
    a[: d // 2] = 2.0
    b = -a
    b[-10:] = 3.0  # all but 10 positions cancel; the majority is +
    check(device, base, [a, b], density=1.0)
    assert mt.last_stats()["cancelled"] > d // 64


def test_nonfinite_is_reported_with_task_and_index(device):
    base, thetas = make_tasks(500, 3, seed=0)
    thetas[2] = thetas[2].clone()
    thetas[2][123] = float("nan")
    with pytest.raises(ValueError, match=r"thetas\[2\] contains a non-finite value \(nan\) at index 123"):
        fastmerge.merge_ties(base.to(device), [t.to(device) for t in thetas], backend="triton")
    base = base.clone()
    base[7] = float("inf")
    with pytest.raises(ValueError, match=r"base contains a non-finite value \(inf\) at index 7"):
        fastmerge.merge_ties(base.to(device), [t.to(device) for t in thetas], backend="triton")


def test_deterministic(device, small_sample):
    base, thetas = make_tasks(3001, 4, seed=8)
    b, th = base.to(device), [t.to(device) for t in thetas]
    one = fastmerge.merge_ties(b, th, density=0.2, backend="triton")
    two = fastmerge.merge_ties(b, th, density=0.2, backend="triton")
    assert torch.equal(bits(one.cpu()), bits(two.cpu()))


def test_chunk_loops_beyond_the_grid(device, small_sample, monkeypatch):
    # a second grid dimension of 1 makes the fix-up and the candidate histograms loop over chunks
    monkeypatch.setattr(small_sample, "GRID_Y_MAX", 1)
    base, thetas = make_tasks(5003, 3, seed=21)
    for merge in MODES:
        check(device, base, thetas, density=0.2, merge=merge)
    assert small_sample.last_stats()["candidates"] > 1024  # more than one chunk per problem


def test_overflowing_task_vector_is_reported(device):
    base = torch.zeros(300)
    x = torch.full((300,), 3e38)
    with pytest.raises(ValueError, match="overflowed to infinity"):
        fastmerge.merge_ties(base.to(device), [x.to(device), x.to(device)], weights=[10.0, 1.0], backend="triton")
    with pytest.raises(ValueError, match="overflowed to infinity"):
        fastmerge.merge_ties(base, [x, x], weights=[10.0, 1.0], backend="cpu")
