"""Both GPU backends (triton, cuda) against the reference on CUDA tensors.

Skipped where no CUDA device is present, except under ``FASTMERGE_CUDA_EMULATE=1``: the ``cuda``
backend's kernels then run on CPU tensors in the CPU emulator of the CUDA execution model, through
the same cases (the largest ones scaled down: the emulator runs every CUDA thread as a fiber).
The same awkward cases as the CPU suite, plus sizes large enough for the production paths (sampled
TIES brackets, many work items) and one op over more than 2^31 elements (int64 indexing).
"""

from __future__ import annotations

import pytest
import torch

import fastmerge
from fastmerge import _cuda
from fastmerge import reference as ref
from conftest import make_tasks, strided

EMULATED = _cuda.EMULATED
DEV = _cuda.device_type() if EMULATED else "cuda"
ENABLED = torch.cuda.is_available() or (EMULATED and _cuda.AVAILABLE)
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    not ENABLED, reason="needs a CUDA device (or FASTMERGE_CUDA_EMULATE=1 with the emulator built)")]

SIZES = [1, 2, 3, 7, 127, 257, 1021, 65537, 1_000_003]
MODES = ["mean", "sum", "max"]


def backends():
    if EMULATED:
        return ["cuda"]
    if not torch.cuda.is_available():
        return ["triton", "cuda"]
    return [b for b in ("triton", "cuda") if b in fastmerge.available_backends("cuda")]


BACKENDS = backends()


def big(n: int) -> int:
    """A large test size, divided by 5 in the emulator (which runs each CUDA thread as a fiber)."""
    return n // 5 if EMULATED else n


def on_dev(xs):
    return [x.to(DEV) for x in xs]


needs_gpu = pytest.mark.skipif(EMULATED, reason="about the GPU installation or memory, not run in the emulator")


@needs_gpu
def test_both_gpu_backends_are_available():
    assert fastmerge.available_backends("cuda") == ["reference", "triton", "cuda"]


@needs_gpu
def test_default_backend_for_cuda_tensors_is_triton():
    assert fastmerge._ops.resolve_backend(None, torch.device("cuda")) == "triton"


def bits(x):
    return x.reshape(-1).view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def ordered(x):
    """The floats as integers in the order of their values, one apart per representable step (±0 both 0)."""
    b = bits(x).long()
    mag = b & ((1 << (8 * x.element_size() - 1)) - 1)
    return torch.where(b < 0, -mag, mag)


def assert_same(out, expect):
    """The kernels keep the reference's operation order without fused multiply-adds: in the emulator
    the results are the reference's, bit for bit; on a GPU at most one unit in the last place apart."""
    assert out.dtype == expect.dtype and out.shape == expect.shape
    if EMULATED:
        assert torch.equal(bits(out), bits(expect))
        return
    a, b = ordered(out), ordered(expect)
    same_sign = (a >= 0) == (b >= 0)
    # opposite signs are one step apart only as 0 and the smallest subnormal (or the two zeros)
    opposite_ok = (a.abs() <= 1) & (b.abs() <= 1) & (a.abs() + b.abs() <= 1)
    close = torch.where(same_sign, (a - b).abs() <= 1, opposite_ok)
    assert bool(close.all()), f"{int((~close).sum())} entries more than one ulp apart"


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_streaming_ops(be, d, dtype):
    # task vectors of order 1: a dropped term or a wrong weight moves the result by many ulps
    base, th = make_tasks(d, 5, dtype=dtype, seed=d % 97, scale=100.0)
    w = [1.0, 0.5, 2.0, 0.0, 3.0]
    out = fastmerge.uniform_average(on_dev(th), weights=w, backend=be).cpu()
    assert_same(out, ref.uniform_average(th, w))
    # the weights matter: most entries differ from the plain mean of the inputs
    plain = (torch.stack([x.double() for x in th]).sum(0) / 5).to(dtype)
    assert float((out != plain).double().mean()) > 0.5
    lam = [0.3, -0.2, 1.0, 0.5, 0.7]
    out = fastmerge.task_arithmetic(base.to(DEV), on_dev(th), lam, backend=be).cpu()
    assert_same(out, ref.task_arithmetic(base, th, lam))
    assert float((out != base).double().mean()) > 0.5
    G = fastmerge.task_vector_cosine(base.to(DEV), on_dev(th), gram=True, backend=be).cpu()
    torch.testing.assert_close(G, ref.task_vector_cosine(base, th, gram=True), rtol=1e-9, atol=1e-12)
    # repeated offsets: empty blocks at the start (small d) and in the middle, a one-entry block at the end
    blocks = [0, d // 3, d // 3, (2 * d) // 3, max(0, d - 1), d]
    gen = torch.Generator().manual_seed(d)
    coefs = torch.randn(5, len(blocks) - 1, dtype=torch.float32, generator=gen)
    out = fastmerge.block_scale(base.to(DEV), on_dev(th), coefs.to(DEV), blocks=blocks, backend=be).cpu()
    assert_same(out, ref.block_scale(base, th, coefs, blocks))
    g = torch.randn(d, generator=gen).to(dtype)
    gc = fastmerge._ops.block_scale_backward_op(g.to(DEV), on_dev(th), coefs.to(DEV), torch.tensor(blocks), be).cpu()
    torch.testing.assert_close(gc, ref.block_scale_backward(g, th, coefs.double(), blocks)[1],
                               rtol=1e-9, atol=1e-12)
    assert torch.equal(gc[:, 1], torch.zeros(5, dtype=torch.float64))  # the empty block [d//3, d//3)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_hand_worked_values(be, dtype):
    # small dyadic numbers: every sum and result is exact in every dtype (d = 2 and d = 1)
    x = [torch.tensor(v, dtype=dtype) for v in ([1.0, -3.0], [2.0, 0.5], [4.0, 1.5])]
    # (1 + 2*2 + 4) / 4 = 2.25 and (-3 + 2*0.5 + 1.5) / 4 = -0.125 (unweighted: 7/3 and -1/3)
    out = fastmerge.uniform_average(on_dev(x), weights=[1.0, 2.0, 1.0], backend=be).cpu()
    assert torch.equal(out, torch.tensor([2.25, -0.125], dtype=dtype))
    out = fastmerge.uniform_average(on_dev([v[:1] for v in x[:2]]), weights=[1.0, 3.0], backend=be).cpu()
    assert torch.equal(out, torch.tensor([1.75], dtype=dtype))  # (1*1 + 3*2) / 4
    base = torch.tensor([1.0, -2.0], dtype=dtype)
    t1 = torch.tensor([2.0, 0.0], dtype=dtype)   # task vector (1, 2)
    t2 = torch.tensor([0.5, -1.0], dtype=dtype)  # task vector (-0.5, 1)
    # base + 0.5*(1, 2) + 2*(-0.5, 1) = (0.5, 1); the base alone is (1, -2), without t2 (1.5, -1)
    out = fastmerge.task_arithmetic(base.to(DEV), on_dev([t1, t2]), [0.5, 2.0], backend=be).cpu()
    assert torch.equal(out, torch.tensor([0.5, 1.0], dtype=dtype))
    out = fastmerge.task_arithmetic(base[1:].to(DEV), on_dev([t1[1:], t2[1:]]), 0.25, backend=be).cpu()
    assert torch.equal(out, torch.tensor([-1.25], dtype=dtype))  # -2 + 0.25*2 + 0.25*1
    # block_scale: base + coefs[t, block] * v_t with blocks [0, 1) and [1, 2)
    coefs = torch.tensor([[2.0, -1.0], [0.5, 4.0]], device=DEV)
    out = fastmerge.block_scale(base.to(DEV), on_dev([t1, t2]), coefs, blocks=[0, 1, 2], backend=be).cpu()
    assert torch.equal(out, torch.tensor([1.0 + 4.0 + 0.25, -2.0 + 0.0 - 4.0], dtype=dtype))


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("merge", MODES)
def test_ties_bit_exact(be, d, merge):
    base, th = make_tasks(d, 4, seed=d % 89)
    out = fastmerge.merge_ties(base.to(DEV), on_dev(th), density=0.2, merge=merge, backend=be).cpu()
    assert torch.equal(bits(out), bits(ref.merge_ties(base, th, density=0.2, merge=merge)))


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("density", [1.0, 0.2, 0.01, 1e-7])
def test_ties_large_dtypes_densities(be, dtype, density):
    d = big(1_000_003)  # above the Triton sample size: the bracket, candidate and fix-up paths run
    base, th = make_tasks(d, 8, dtype=dtype, seed=3)
    kw = dict(density=density, lam=1.3, weights=[1, 2, 1, 0.5, 1, 1, 3, 1])
    out = fastmerge.merge_ties(base.to(DEV), on_dev(th), backend=be, **kw).cpu()
    assert torch.equal(bits(out), bits(ref.merge_ties(base, th, **kw)))


@pytest.mark.parametrize("be", BACKENDS)
def test_ties_scope_tensor_and_awkward_inputs(be):
    d = big(2_000_003)
    base, th = make_tasks(d, 3, seed=5)
    layout = [0, 1, 1, 100, 65636, 65637, d // 2, d]
    for merge in MODES:
        out = fastmerge.merge_ties(base.to(DEV), on_dev(th), density=0.3, merge=merge, scope="tensor", layout=layout,
                                   backend=be).cpu()
        assert torch.equal(bits(out), bits(ref.merge_ties(base, th, density=0.3, merge=merge, scope="tensor",
                                                          layout=layout)))
    # exact cancellations (majority sign), an all-zero task, ±0, ties at the threshold
    a = torch.randint(1, 4, (d,)).float()
    b = torch.where(torch.arange(d) < d // 2, -a, 0.5 * a)
    z = torch.zeros(d)
    z[::7] = -0.0
    for merge in MODES:
        out = fastmerge.merge_ties(z.to(DEV), [a.to(DEV), b.to(DEV), z.to(DEV)], density=0.4, merge=merge,
                                   backend=be).cpu()
        assert torch.equal(bits(out), bits(ref.merge_ties(z, [a, b, z], density=0.4, merge=merge)))
    # non-contiguous and stacked inputs
    base, th = make_tasks(100_003, 3, seed=6)
    out = fastmerge.merge_ties(strided(base).to(DEV)[::1], torch.stack(th).to(DEV), density=0.2, backend=be).cpu()
    assert torch.equal(bits(out), bits(ref.merge_ties(base, th, density=0.2)))


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("T", [1, 2, 9, 15, 16, 23, 64, 100])
def test_gram_task_counts(be, T):
    # T <= 15: several CUDA threads share a pair (lane sums); T >= 16: one thread per pair, and for
    # T = 64 and 100 the shared-memory tile is narrower than the block. Two 16384-entry chunks and a
    # partial one.
    d = 2 * 16384 + 7
    base, th = make_tasks(d, T, seed=T)
    G = fastmerge.task_vector_cosine(base.to(DEV), on_dev(th), gram=True, backend=be).cpu()
    torch.testing.assert_close(G, ref.task_vector_cosine(base, th, gram=True), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("T", [33, 40])
def test_ties_many_tasks(be, T):
    # more tasks than a thread keeps in registers: the trimmed values live in global scratch
    d = 20_011
    base, th = make_tasks(d, T, seed=T)
    th[1][:500] = base[:500] + (th[0][:500] - base[:500]) * -1  # exact cancellations with task 0
    for t in range(2, T):
        th[t][:500] = base[:500]
    for merge in MODES:
        for scope, layout in (("global", None), ("tensor", [0, 17, 5000, d])):
            kw = dict(density=0.3, merge=merge, scope=scope, layout=layout)
            out = fastmerge.merge_ties(base.to(DEV), on_dev(th), backend=be, **kw).cpu()
            assert torch.equal(bits(out), bits(ref.merge_ties(base, th, **kw)))


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("d,ncancel", [(1000, 700), (300_001, 270_000)])
def test_ties_cancelled_sums_listed_or_rerun(be, d, ncancel):
    # The first `ncancel` trimmed sums cancel exactly, so their elected sign is the majority sign of
    # the other entries (negative here). 700 positions are listed and rewritten; 270,000 overflow the
    # CUDA list (2^18 positions) and the merge pass runs again with the majority known.
    a = torch.randint(1, 5, (d,)).float()
    a[ncancel + (d - ncancel) // 4:] *= -1
    b = torch.where(torch.arange(d) < ncancel, -a, a)
    base = torch.zeros(d)
    for merge in MODES:
        out = fastmerge.merge_ties(base.to(DEV), [a.to(DEV), b.to(DEV)], density=1.0, merge=merge,
                                   backend=be).cpu()
        expect = ref.merge_ties(base, [a, b], density=1.0, merge=merge)
        assert torch.equal(bits(out), bits(expect))
        assert (expect[:ncancel] * a[:ncancel] < 0).sum() > 0  # the majority sign was needed


@pytest.mark.parametrize("be", BACKENDS)
def test_nonfinite_named(be):
    base, th = make_tasks(100_000, 3, seed=0)
    th[1][77_777] = float("nan")
    for call in (lambda: fastmerge.merge_ties(base.to(DEV), on_dev(th), backend=be),
                 lambda: fastmerge.task_arithmetic(base.to(DEV), on_dev(th), 0.3, backend=be),
                 lambda: fastmerge.task_vector_cosine(base.to(DEV), on_dev(th), backend=be)):
        with pytest.raises(ValueError, match=r"thetas\[1\] contains a non-finite value \(nan\) at index 77777"):
            call()


@pytest.mark.parametrize("be", BACKENDS)
def test_deterministic(be):
    d = big(5_000_000)
    base, th = make_tasks(d, 8, seed=1)
    b, t = base.to(DEV), on_dev(th)
    for f in (lambda: fastmerge.task_vector_cosine(b, t, gram=True, backend=be),
              lambda: fastmerge.merge_ties(b, t, backend=be),
              lambda: fastmerge._ops.block_scale_backward_op(b, t, torch.ones(8, 2, device=DEV),
                                                             torch.tensor([0, big(1_234_567), d]), be)):
        assert torch.equal(bits(f()), bits(f()))


@pytest.mark.parametrize("be", BACKENDS)
def test_block_scale_autograd(be):
    base, th = make_tasks(10_007, 3, dtype=torch.float64, seed=2)
    coefs = torch.randn(3, 4, dtype=torch.float64, device=DEV, requires_grad=True)
    blocks = [0, 10, 5000, 5001, 10_007]
    y = fastmerge.block_scale(base.to(DEV), on_dev(th), coefs, blocks=blocks, backend=be)
    g = torch.randn_like(y)
    y.backward(g)
    expect = ref.block_scale_backward(g.cpu(), th, coefs.detach().cpu(), blocks)[1]
    torch.testing.assert_close(coefs.grad.cpu(), expect, rtol=1e-12, atol=1e-12)


@needs_gpu
@pytest.mark.parametrize("be", BACKENDS)
def test_more_than_2_pow_31_elements(be):
    d = (1 << 31) + 1000
    free, _ = torch.cuda.mem_get_info()
    if free < 5 * d * 2 + (2 << 30):
        pytest.skip("not enough GPU memory for a > 2^31-element case")

    def pattern(p):  # fp16 small integers i % p: every result is exact and cheap to predict
        return torch.arange(p, dtype=torch.float16, device=DEV).repeat(d // p + 1)[:d]

    def idx(sl):
        return torch.arange(sl.start, sl.stop, device=DEV, dtype=torch.int64)

    x0, x1 = pattern(7), pattern(5)
    out = fastmerge.uniform_average([x0, x1], weights=[1.0, 1.0], backend=be)
    for sl in (slice(0, 3000), slice((1 << 31) - 1500, (1 << 31) + 1500), slice(d - 3000, d)):
        i = idx(sl)
        assert torch.equal(out[sl].float(), ((i % 7) + (i % 5)).float() / 2)
    del out
    blocks = [0, (1 << 31) - 5, d]
    coefs = torch.tensor([[1.0, 2.0]], device=DEV)
    y = fastmerge.block_scale(x0, [x1], coefs, blocks=blocks, backend=be)
    sl = slice(d - 3000, d)
    i = idx(sl)
    assert torch.equal(y[sl].float(), ((i % 7) + 2 * (i % 5)).float())
