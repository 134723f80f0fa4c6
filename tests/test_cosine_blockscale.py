"""task_vector_cosine and block_scale (forward and backward) against their reference twins."""

from __future__ import annotations

import pytest
import torch

import fastmerge
from fastmerge import reference as ref
from fastmerge._ops import block_scale_backward_op
from conftest import AWKWARD_SIZES, DTYPES, make_tasks, strided


def assert_gram_close(G, Gr):
    """Each dot product within 1e-12 of the scale of its pair, sqrt(G_uu G_vv): the fp64 sums run in
    a different order in every build (vector width, tiles), and an entry that nearly cancels has a
    rounding error relative to the norms, not to itself."""
    scale = torch.sqrt(torch.outer(Gr.diagonal(), Gr.diagonal()))
    err = (G - Gr).abs()
    assert bool((err <= 1e-12 * scale + 1e-300).all()), f"largest error / scale {float((err / scale.clamp_min(1e-300)).max()):.3g}"
    # the diagonal (sums of squares, no cancellation) stays within 1e-12 of itself
    torch.testing.assert_close(G.diagonal(), Gr.diagonal(), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("d", AWKWARD_SIZES)
@pytest.mark.parametrize("T", [1, 3, 6])
def test_gram_and_cosine_match_reference(d, T):
    base, thetas = make_tasks(d, T, seed=d * 7 + T)
    G = fastmerge.task_vector_cosine(base, thetas, gram=True, backend="cpu")
    Gr = ref.task_vector_cosine(base, thetas, gram=True)
    assert G.dtype == torch.float64 and G.shape == (T, T)
    assert_gram_close(G, Gr)
    C = fastmerge.task_vector_cosine(base, thetas, backend="cpu")
    torch.testing.assert_close(C, ref.task_vector_cosine(base, thetas), rtol=1e-12, atol=1e-12)
    # and the formula, computed here: τ_u·τ_v / (|τ_u| |τ_v|) with τ = θ − base taken in float32
    tau = torch.stack([(x - base).double() for x in thetas])
    n = tau.norm(dim=1)
    torch.testing.assert_close(C, (tau @ tau.T) / torch.outer(n, n), rtol=1e-12, atol=1e-12)
    assert torch.equal(G, G.T)


@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
def test_cosine_dtypes_against_float64_math(dtype, rtol, atol):
    base, thetas = make_tasks(10_007, 4, dtype=dtype, seed=3)
    C = fastmerge.task_vector_cosine(base, thetas)
    tau = torch.stack([x.double() - base.double() for x in thetas])
    n = tau.norm(dim=1)
    expect = (tau @ tau.T) / (n[:, None] * n[None, :])
    torch.testing.assert_close(C, expect, rtol=1e-6, atol=1e-6)


def test_zero_task_vector_has_cosine_zero_never_nan():
    base, thetas = make_tasks(1000, 3, seed=1)
    thetas[1] = base.clone()
    C = fastmerge.task_vector_cosine(base, thetas)
    assert not torch.isnan(C).any()
    assert torch.equal(C[1], torch.zeros(3, dtype=torch.float64))
    assert C[0, 0] == 1.0 and C[2, 2] == 1.0
    # opposite vectors: exactly -1 after clamping, never beyond
    C2 = fastmerge.task_vector_cosine(torch.zeros(4), [torch.tensor([1.0, 2, 3, 4]), -torch.tensor([1.0, 2, 3, 4])])
    assert C2[0, 1] == -1.0


def test_cosine_non_contiguous_and_threads():
    base, thetas = make_tasks(400_009, 5, seed=2)
    expect = fastmerge.task_vector_cosine(base, thetas, gram=True)
    assert_gram_close(expect, ref.task_vector_cosine(base, thetas, gram=True))
    assert torch.equal(fastmerge.task_vector_cosine(strided(base), [strided(x) for x in thetas], gram=True), expect)
    torch.set_num_threads(1)
    one = fastmerge.task_vector_cosine(base, thetas, gram=True)
    torch.set_num_threads(2)
    assert torch.equal(one, fastmerge.task_vector_cosine(base, thetas, gram=True))


def _blocks(d, kind):
    if kind == "one":
        return torch.tensor([0, d])
    if kind == "uneven":
        cuts = sorted({0, d, *[int(v) for v in torch.randint(0, d + 1, (5,), generator=torch.Generator().manual_seed(d))]})
        return torch.tensor(cuts)
    return torch.arange(0, d + 1, max(1, d // 7)).tolist() + ([d] if d % max(1, d // 7) else [])


@pytest.mark.parametrize("d", [1, 2, 31, 257, 4099, 65537, 131073])
@pytest.mark.parametrize("kind", ["one", "uneven"])
@pytest.mark.parametrize("T", [1, 4])
def test_block_scale_forward_matches_reference(d, kind, T):
    base, vecs = make_tasks(d, T, seed=d + T)
    off = _blocks(d, kind)
    B = len(off) - 1
    coefs = torch.randn(T, B, generator=torch.Generator().manual_seed(1))
    out = fastmerge.block_scale(base, vecs, coefs, off, backend="cpu")
    assert torch.equal(out, ref.block_scale(base, vecs, coefs, off))


@pytest.mark.parametrize("dtype,rtol,atol", DTYPES + [(torch.float64, 1e-12, 1e-12)])
def test_block_scale_dtypes_and_backward(dtype, rtol, atol):
    d, T = 5003, 3
    base, vecs = make_tasks(d, T, dtype=dtype, seed=4)
    off = torch.tensor([0, 1, 1000, 1000, 4000, d])  # an empty block too
    coefs = torch.randn(T, 5, dtype=torch.float32)
    out = fastmerge.block_scale(base, vecs, coefs, off)
    assert out.dtype == dtype
    assert torch.equal(out, ref.block_scale(base, vecs, coefs, off))
    grad = torch.randn(d).to(dtype)
    gc = block_scale_backward_op(grad, vecs, coefs, off, "cpu")
    _, gr = ref.block_scale_backward(grad, vecs, coefs.double(), off)
    torch.testing.assert_close(gc, gr, rtol=1e-12, atol=1e-12)
    assert torch.equal(gc[:, 2], torch.zeros(T, dtype=torch.float64))


def test_block_scale_autograd_matches_reference_autograd():
    d, T = 2049, 3
    base, vecs = make_tasks(d, T, seed=6)
    off = torch.tensor([0, 100, 1500, d])
    coefs = torch.randn(T, 3, requires_grad=True)
    coefs_r = coefs.detach().clone().requires_grad_(True)
    base_a = base.clone().requires_grad_(True)
    base_r = base.clone().requires_grad_(True)
    vecs_a = [v.clone().requires_grad_(True) for v in vecs]
    vecs_r = [v.clone().requires_grad_(True) for v in vecs]
    w = torch.randn(d)
    (fastmerge.block_scale(base_a, vecs_a, coefs, off) * w).sum().backward()
    (ref.block_scale(base_r, vecs_r, coefs_r, off) * w).sum().backward()
    torch.testing.assert_close(coefs.grad, coefs_r.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base_a.grad, base_r.grad)
    for a, b in zip(vecs_a, vecs_r):
        torch.testing.assert_close(a.grad, b.grad)


def test_block_scale_gradcheck_fp64():
    d, T = 37, 2
    base = torch.randn(d, dtype=torch.float64, requires_grad=True)
    vecs = [torch.randn(d, dtype=torch.float64, requires_grad=True) for _ in range(T)]
    coefs = torch.randn(T, 3, dtype=torch.float64, requires_grad=True)
    off = torch.tensor([0, 10, 11, d])
    fn = lambda b, c, v0, v1: fastmerge.block_scale(b, [v0, v1], c, off, backend="cpu")
    assert torch.autograd.gradcheck(fn, (base, coefs, *vecs))


def test_block_scale_threads_bit_identical():
    d, T = 700_001, 3
    base, vecs = make_tasks(d, T, seed=2)
    off = torch.tensor([0, 3, 333_333, d])
    coefs = torch.randn(T, 3)
    grad = torch.randn(d)
    torch.set_num_threads(1)
    f1 = fastmerge.block_scale(base, vecs, coefs, off)
    b1 = block_scale_backward_op(grad, vecs, coefs, off, "cpu")
    torch.set_num_threads(2)
    assert torch.equal(f1, fastmerge.block_scale(base, vecs, coefs, off))
    assert torch.equal(b1, block_scale_backward_op(grad, vecs, coefs, off, "cpu"))


@pytest.mark.parametrize("T", [5, 8, 9, 12, 13])
@pytest.mark.parametrize("d", [7, 2053, 131_101])
def test_many_tasks_gram_and_backward(T, d):
    # more tasks than one register tile / group (paired tiles, partial blocks), tails, several work
    # items, strided inputs
    base, vecs = make_tasks(d, T, seed=d + T)
    G = fastmerge.task_vector_cosine(base, vecs, gram=True, backend="cpu")
    assert_gram_close(G, ref.task_vector_cosine(base, vecs, gram=True))
    assert torch.equal(G, G.T)
    assert torch.equal(fastmerge.task_vector_cosine(strided(base), [strided(v) for v in vecs], gram=True), G)
    off = _blocks(d, "uneven")
    coefs = torch.randn(T, len(off) - 1)
    grad = torch.randn(d, generator=torch.Generator().manual_seed(d))
    gc = block_scale_backward_op(grad, vecs, coefs, off, "cpu")
    _, gr = ref.block_scale_backward(grad, vecs, coefs.double(), off)
    torch.testing.assert_close(gc, gr, rtol=1e-12, atol=1e-12)
    assert torch.equal(block_scale_backward_op(strided(grad), [strided(v) for v in vecs], coefs, off, "cpu"), gc)
    torch.set_num_threads(1)
    try:
        G1 = fastmerge.task_vector_cosine(base, vecs, gram=True, backend="cpu")
        gc1 = block_scale_backward_op(grad, vecs, coefs, off, "cpu")
    finally:
        torch.set_num_threads(2)
    assert torch.equal(G1, G) and torch.equal(gc1, gc)


def test_nonfinite_in_a_later_task_group():
    base, vecs = make_tasks(70_001, 11, seed=3)
    vecs[10][69_999] = float("nan")
    with pytest.raises(ValueError, match=r"thetas\[10\] contains a non-finite value \(nan\) at index 69999"):
        fastmerge.task_vector_cosine(base, vecs, backend="cpu")
    off = torch.tensor([0, 5, 70_001])
    with pytest.raises(ValueError, match=r"vectors\[10\] contains a non-finite value \(nan\) at index 69999"):
        block_scale_backward_op(torch.randn(70_001), vecs, torch.ones(11, 2), off, "cpu")
