"""Both GPU backends (triton, cuda) against the reference on CUDA tensors.

Skipped where no CUDA device is present. The same awkward cases as the CPU suite, plus sizes large
enough for the production paths (sampled TIES brackets, many work items) and one op over more than
2^31 elements (int64 indexing).
"""

from __future__ import annotations

import pytest
import torch

import fastmerge
from fastmerge import reference as ref
from conftest import make_tasks, strided

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SIZES = [1, 2, 3, 7, 127, 257, 1021, 65537, 1_000_003]
MODES = ["mean", "sum", "max"]


def backends():
    if not torch.cuda.is_available():
        return ["triton", "cuda"]
    return [b for b in ("triton", "cuda") if b in fastmerge.available_backends("cuda")]


BACKENDS = backends()


def bits(x):
    return x.reshape(-1).view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def cuda(xs):
    return [x.cuda() for x in xs]


def test_both_gpu_backends_are_available():
    assert fastmerge.available_backends("cuda") == ["reference", "triton", "cuda"]


def test_default_backend_for_cuda_tensors_is_triton():
    assert fastmerge._ops.resolve_backend(None, torch.device("cuda")) == "triton"


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 1e-3),
                                       (torch.float64, 1e-12)])
def test_streaming_ops(be, d, dtype, tol):
    base, th = make_tasks(d, 5, dtype=dtype, seed=d % 97)
    w = [1.0, 0.5, 2.0, 0.0, 3.0]
    out = fastmerge.uniform_average(cuda(th), weights=w, backend=be).cpu()
    torch.testing.assert_close(out, ref.uniform_average(th, w), rtol=tol, atol=tol)
    lam = [0.3, -0.2, 1.0, 0.5, 0.7]
    out = fastmerge.task_arithmetic(base.cuda(), cuda(th), lam, backend=be).cpu()
    torch.testing.assert_close(out, ref.task_arithmetic(base, th, lam), rtol=tol, atol=tol)
    G = fastmerge.task_vector_cosine(base.cuda(), cuda(th), gram=True, backend=be).cpu()
    torch.testing.assert_close(G, ref.task_vector_cosine(base, th, gram=True), rtol=1e-9, atol=1e-12)
    blocks = sorted({0, d, d // 3, d // 3, (2 * d) // 3, max(0, d - 1)})
    coefs = torch.randn(5, len(blocks) - 1, dtype=torch.float32)
    out = fastmerge.block_scale(base.cuda(), cuda(th), coefs.cuda(), blocks=blocks, backend=be).cpu()
    torch.testing.assert_close(out, ref.block_scale(base, th, coefs, blocks), rtol=tol, atol=tol)
    g = torch.randn(d).to(dtype)
    gc = fastmerge._ops.block_scale_backward_op(g.cuda(), cuda(th), coefs.cuda(), torch.tensor(blocks), be).cpu()
    torch.testing.assert_close(gc, ref.block_scale_backward(g, th, coefs.double(), blocks)[1],
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("merge", MODES)
def test_ties_bit_exact(be, d, merge):
    base, th = make_tasks(d, 4, seed=d % 89)
    out = fastmerge.merge_ties(base.cuda(), cuda(th), density=0.2, merge=merge, backend=be).cpu()
    assert torch.equal(bits(out), bits(ref.merge_ties(base, th, density=0.2, merge=merge)))


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("density", [1.0, 0.2, 0.01, 1e-7])
def test_ties_large_dtypes_densities(be, dtype, density):
    d = 1_000_003  # above the sample size: the bracket, candidate and fix-up paths run
    base, th = make_tasks(d, 8, dtype=dtype, seed=3)
    kw = dict(density=density, lam=1.3, weights=[1, 2, 1, 0.5, 1, 1, 3, 1])
    out = fastmerge.merge_ties(base.cuda(), cuda(th), backend=be, **kw).cpu()
    assert torch.equal(bits(out), bits(ref.merge_ties(base, th, **kw)))


@pytest.mark.parametrize("be", BACKENDS)
def test_ties_scope_tensor_and_awkward_inputs(be):
    d = 2_000_003
    base, th = make_tasks(d, 3, seed=5)
    layout = [0, 1, 1, 100, 65636, 65637, 1_000_000, d]
    for merge in MODES:
        out = fastmerge.merge_ties(base.cuda(), cuda(th), density=0.3, merge=merge, scope="tensor", layout=layout,
                                   backend=be).cpu()
        assert torch.equal(bits(out), bits(ref.merge_ties(base, th, density=0.3, merge=merge, scope="tensor",
                                                          layout=layout)))
    # exact cancellations (majority sign), an all-zero task, ±0, ties at the threshold
    a = torch.randint(1, 4, (d,)).float()
    b = torch.where(torch.arange(d) < d // 2, -a, 0.5 * a)
    z = torch.zeros(d)
    z[::7] = -0.0
    for merge in MODES:
        out = fastmerge.merge_ties(z.cuda(), [a.cuda(), b.cuda(), z.cuda()], density=0.4, merge=merge,
                                   backend=be).cpu()
        assert torch.equal(bits(out), bits(ref.merge_ties(z, [a, b, z], density=0.4, merge=merge)))
    # non-contiguous and stacked inputs
    base, th = make_tasks(100_003, 3, seed=6)
    out = fastmerge.merge_ties(strided(base).cuda()[::1], torch.stack(th).cuda(), density=0.2, backend=be).cpu()
    assert torch.equal(bits(out), bits(ref.merge_ties(base, th, density=0.2)))


@pytest.mark.parametrize("be", BACKENDS)
def test_nonfinite_named(be):
    base, th = make_tasks(100_000, 3, seed=0)
    th[1][77_777] = float("nan")
    for call in (lambda: fastmerge.merge_ties(base.cuda(), cuda(th), backend=be),
                 lambda: fastmerge.task_arithmetic(base.cuda(), cuda(th), 0.3, backend=be),
                 lambda: fastmerge.task_vector_cosine(base.cuda(), cuda(th), backend=be)):
        with pytest.raises(ValueError, match=r"thetas\[1\] contains a non-finite value \(nan\) at index 77777"):
            call()


@pytest.mark.parametrize("be", BACKENDS)
def test_deterministic(be):
    base, th = make_tasks(5_000_000, 8, seed=1)
    b, t = base.cuda(), cuda(th)
    for f in (lambda: fastmerge.task_vector_cosine(b, t, gram=True, backend=be),
              lambda: fastmerge.merge_ties(b, t, backend=be),
              lambda: fastmerge._ops.block_scale_backward_op(b, t, torch.ones(8, 2, device="cuda"),
                                                             torch.tensor([0, 1_234_567, 5_000_000]), be)):
        assert torch.equal(bits(f()), bits(f()))


@pytest.mark.parametrize("be", BACKENDS)
def test_block_scale_autograd(be):
    base, th = make_tasks(10_007, 3, dtype=torch.float64, seed=2)
    coefs = torch.randn(3, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    blocks = [0, 10, 5000, 5001, 10_007]
    y = fastmerge.block_scale(base.cuda(), cuda(th), coefs, blocks=blocks, backend=be)
    g = torch.randn_like(y)
    y.backward(g)
    expect = ref.block_scale_backward(g.cpu(), th, coefs.detach().cpu(), blocks)[1]
    torch.testing.assert_close(coefs.grad.cpu(), expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("be", BACKENDS)
def test_more_than_2_pow_31_elements(be):
    d = (1 << 31) + 1000
    free, _ = torch.cuda.mem_get_info()
    if free < 5 * d * 2 + (2 << 30):
        pytest.skip("not enough GPU memory for a > 2^31-element case")

    def pattern(p):  # fp16 small integers i % p: every result is exact and cheap to predict
        return torch.arange(p, dtype=torch.float16, device="cuda").repeat(d // p + 1)[:d]

    def idx(sl):
        return torch.arange(sl.start, sl.stop, device="cuda", dtype=torch.int64)

    x0, x1 = pattern(7), pattern(5)
    out = fastmerge.uniform_average([x0, x1], weights=[1.0, 1.0], backend=be)
    for sl in (slice(0, 3000), slice((1 << 31) - 1500, (1 << 31) + 1500), slice(d - 3000, d)):
        i = idx(sl)
        assert torch.equal(out[sl].float(), ((i % 7) + (i % 5)).float() / 2)
    del out
    blocks = [0, (1 << 31) - 5, d]
    coefs = torch.tensor([[1.0, 2.0]], device="cuda")
    y = fastmerge.block_scale(x0, [x1], coefs, blocks=blocks, backend=be)
    sl = slice(d - 3000, d)
    i = idx(sl)
    assert torch.equal(y[sl].float(), ((i % 7) + 2 * (i % 5)).float())
