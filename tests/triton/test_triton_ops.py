"""The Triton kernels of fastmerge against their reference twins (``fastmerge.reference``).

Under ``TRITON_INTERPRET=1`` they run on CPU tensors (sizes stay small: the interpreter is slow);
with a GPU they run on ``cuda`` tensors. The kernel modules are called directly with validated
arguments, the way the op layer's dispatch calls them.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton kernel tests need TRITON_INTERPRET=1 (CPU tensors) or a CUDA GPU", allow_module_level=True)

import fastmerge  # noqa: E402
from fastmerge import reference as _ref  # noqa: E402


def _cpu(v):
    if isinstance(v, torch.Tensor):
        return v.cpu()
    if isinstance(v, (list, tuple)):
        return type(v)(_cpu(x) for x in v)
    return v


class _RefOnCPU:
    """The reference ops evaluated on CPU copies, results moved back to the inputs' device: the
    CPU reference is the ground truth (PyTorch's CUDA kernels may round differently, e.g. division
    by a scalar through its reciprocal)."""

    def __getattr__(self, name):
        fn = getattr(_ref, name)

        def call(*args, **kwargs):
            dev = next((a.device for a in args if isinstance(a, torch.Tensor)),
                       next((a[0].device for a in args if isinstance(a, (list, tuple)) and a
                             and isinstance(a[0], torch.Tensor)), torch.device("cpu")))
            out = fn(*_cpu(args), **{k: _cpu(v) for k, v in kwargs.items()})
            if isinstance(out, tuple):
                return tuple(o.to(dev) if isinstance(o, torch.Tensor) else o for o in out)
            return out.to(dev)

        return call


ref = _RefOnCPU()


def _kernel_module(name: str):
    """``fastmerge.kernels.<name>`` (the module, not the function the package re-exports under the
    same name). A source checkout whose editable install predates the ``kernels`` package mapping
    gets the package loaded from ``kernels/`` directly."""
    try:
        importlib.import_module("fastmerge.kernels")
    except ModuleNotFoundError:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        spec = importlib.util.spec_from_file_location(
            "fastmerge.kernels", os.path.join(root, "kernels", "__init__.py"),
            submodule_search_locations=[os.path.join(root, "kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["fastmerge.kernels"] = mod
        spec.loader.exec_module(mod)
    return importlib.import_module(f"fastmerge.kernels.{name}")


UA = _kernel_module("uniform_average")
TA = _kernel_module("task_arithmetic")
TV = _kernel_module("task_vector_cosine")
BS = _kernel_module("block_scale")

# 1, 2, primes and 2^k ± 1, kept small for the interpreter (~3e6 elements/s)
SIZES = [1, 2, 3, 31, 127, 257, 1021, 4099]
FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def make_tasks(d, T, device, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(d, generator=g) * 0.05).to(dtype)
    thetas = [(base.float() + scale * torch.randn(d, generator=g) * 0.01).to(dtype) for _ in range(T)]
    return base.to(device), [x.to(device) for x in thetas]


from conftest import assert_rounded_from  # noqa: E402  (the main suite's bound, shared)


def cosine_formula(base, thetas):
    """cos(τ_u, τ_v) = τ_u·τ_v / (|τ_u| |τ_v|) of τ_t = θ_t − base (taken in float32, as every op does),
    in float64; a zero vector has cosine 0 with everything."""
    acc = torch.float64 if base.dtype == torch.float64 else torch.float32
    tau = torch.stack([(x.cpu().to(acc) - base.cpu().to(acc)).double() for x in thetas])
    n = tau.norm(dim=1)
    C = (tau @ tau.T) / torch.outer(n, n)
    return torch.nan_to_num(C, nan=0.0)


def strided(x, step=2):
    """The same values as ``x`` in a non-contiguous 1-D view."""
    buf = torch.zeros(x.numel() * step, dtype=x.dtype, device=x.device)
    buf[::step] = x
    return buf[::step]


def blocks(d, kind):
    """Block offsets (int64 CPU tensor, as the op layer hands them over)."""
    if kind == "one":
        off = [0, d]
    elif kind == "tensors":  # a few uneven per-tensor-like blocks
        off = sorted({0, d, d // 7, d // 3, (2 * d) // 3})
    elif kind == "rows":  # many small equal blocks and a tail
        off = list(range(0, d, 16)) + [d]
    elif kind == "singles":  # every entry its own block
        off = list(range(d + 1))
    elif kind == "empty":  # repeated offsets: empty blocks at the start, middle and end
        off = [0, 0, d // 2, d // 2, d // 2, d, d]
    else:
        raise ValueError(kind)
    return torch.tensor(off, dtype=torch.int64)


@pytest.fixture
def small_chunks(monkeypatch):
    """Shrink the fixed chunk sizes so the tiny interpreter inputs still span several chunks and
    work items (multi-chunk reductions, grouped items)."""
    monkeypatch.setattr(TV, "NSUB", 2)
    monkeypatch.setattr(BS, "ITEM_CHUNK", 64)


# ---------------------------------------------------------------- uniform_average

@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("T", [1, 2, 3, 8])
def test_uniform_average_matches_reference(device, d, T):
    _, thetas = make_tasks(d, T, device, seed=d + T)
    out = UA.uniform_average(thetas, [1.0] * T)
    # same operation order, no fused multiply-add: bit for bit
    assert torch.equal(out, ref.uniform_average(thetas))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("d", [1, 2, 257, 4099])
def test_uniform_average_dtypes_and_weights(device, dtype, d):
    # task vectors of order 1 (not 0.01): a wrong weight moves the result by far more than an ulp
    _, thetas = make_tasks(d, 4, device, dtype=dtype, seed=3, scale=100.0)
    w = [0.5, 2.0, 0.0, 1.25]
    out = UA.uniform_average(thetas, w)
    assert out.dtype == dtype and out.device == thetas[0].device
    assert torch.equal(out, ref.uniform_average(thetas, weights=w))
    xs = [x.cpu().double() for x in thetas]
    naive = sum(wt * x for wt, x in zip(w, xs)) / sum(w)
    assert_rounded_from(out.cpu(), naive, sum(wt * x.abs() for wt, x in zip(w, xs)) / sum(w), 2 * len(w) + 2)


def test_uniform_average_exact_on_small_integers(device):
    xs = [torch.arange(1001, dtype=torch.float32, device=device) * k for k in (1, 2, 3, 6)]
    out = UA.uniform_average(xs, [1.0] * 4)
    assert torch.equal(out, torch.arange(1001, dtype=torch.float32, device=device) * 3)


# ---------------------------------------------------------------- task_arithmetic

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("d", [1, 2, 513, 4099])
def test_task_arithmetic_matches_reference(device, dtype, d):
    base, thetas = make_tasks(d, 3, device, dtype=dtype, seed=d, scale=100.0)
    for lam in ([0.4] * 3, [1.0, -0.5, 0.3]):
        out = TA.task_arithmetic(base, thetas, lam)
        assert out.dtype == dtype
        assert torch.equal(out, ref.task_arithmetic(base, thetas, lam=lam)), (dtype, d, lam)
        b = base.cpu().double()
        xs = [x.cpu().double() for x in thetas]
        naive = b + sum(l * (x - b) for l, x in zip(lam, xs))
        mag = b.abs() + sum(abs(l) * (x.abs() + b.abs()) for l, x in zip(lam, xs))
        assert_rounded_from(out.cpu(), naive, mag, 3 * len(lam) + 1)


@pytest.mark.parametrize("dtype", FLOATS)
def test_hand_worked_values(device, dtype):
    # small dyadic numbers: every sum and result is exact in every dtype (d = 2 and d = 1)
    x = [torch.tensor(v, dtype=dtype, device=device) for v in ([1.0, -3.0], [2.0, 0.5], [4.0, 1.5])]
    # (1 + 2*2 + 4) / 4 = 2.25 and (-3 + 2*0.5 + 1.5) / 4 = -0.125 (unweighted: 7/3 and -1/3)
    assert torch.equal(UA.uniform_average(x, [1.0, 2.0, 1.0]).cpu(), torch.tensor([2.25, -0.125], dtype=dtype))
    assert torch.equal(UA.uniform_average([v[:1] for v in x[:2]], [1.0, 3.0]).cpu(),
                       torch.tensor([1.75], dtype=dtype))  # (1*1 + 3*2) / 4
    base = torch.tensor([1.0, -2.0], dtype=dtype, device=device)
    t1 = torch.tensor([2.0, 0.0], dtype=dtype, device=device)   # task vector (1, 2)
    t2 = torch.tensor([0.5, -1.0], dtype=dtype, device=device)  # task vector (-0.5, 1)
    # base + 0.5*(1, 2) + 2*(-0.5, 1) = (0.5, 1); the base alone is (1, -2), without t2 (1.5, -1)
    assert torch.equal(TA.task_arithmetic(base, [t1, t2], [0.5, 2.0]).cpu(), torch.tensor([0.5, 1.0], dtype=dtype))
    assert torch.equal(TA.task_arithmetic(base[1:], [t1[1:], t2[1:]], [0.25, 0.25]).cpu(),
                       torch.tensor([-1.25], dtype=dtype))  # -2 + 0.25*2 + 0.25*1


@pytest.mark.parametrize("T", [1, 8])
def test_task_arithmetic_task_counts(device, T):
    base, thetas = make_tasks(2053, T, device, seed=T)
    lam = [0.1 * (t + 1) for t in range(T)]
    assert torch.equal(TA.task_arithmetic(base, thetas, lam), ref.task_arithmetic(base, thetas, lam=lam))


@pytest.mark.parametrize("d", [1021, 1024])  # row views misaligned (odd d) and 16-byte aligned
def test_elementwise_strided_and_stacked_inputs(device, d):
    base, thetas = make_tasks(d, 3, device, seed=2)
    expect_avg = ref.uniform_average(thetas)
    expect_ta = ref.task_arithmetic(base, thetas, lam=0.7)
    nts = [strided(x, 2) for x in thetas]
    assert not nts[0].is_contiguous()
    assert torch.equal(UA.uniform_average(nts, [1.0] * 3), expect_avg)
    assert torch.equal(TA.task_arithmetic(strided(base, 3), nts, [0.7] * 3), expect_ta)
    stacked = torch.stack(thetas)  # [T, d] arrives as T row views
    rows = list(stacked.unbind(0))
    assert torch.equal(UA.uniform_average(rows, [1.0] * 3), expect_avg)
    assert torch.equal(TA.task_arithmetic(base, rows, [0.7] * 3), expect_ta)
    cols = torch.stack(thetas, dim=1).t()  # every row a strided view
    assert torch.equal(UA.uniform_average(list(cols.unbind(0)), [1.0] * 3), expect_avg)


def test_signed_zeros_and_cancellation(device):
    a = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.0e38], device=device)
    b = torch.tensor([-0.0, -0.0, -1.0, 1.0, 3.0e38], device=device)
    out = UA.uniform_average([a, b], [1.0, 1.0])
    expect = ref.uniform_average([a, b])
    assert torch.equal(out, expect)
    assert torch.equal(torch.signbit(out), torch.signbit(expect))


# ---------------------------------------------------------------- gram / cosine

@pytest.mark.parametrize("d", [1, 2, 127, 4099])
@pytest.mark.parametrize("T", [1, 2, 3, 8, 9, 13])
def test_gram_matches_reference(device, small_chunks, d, T):
    base, thetas = make_tasks(d, T, device, seed=d * 7 + T)
    G = TV.gram(base, thetas)
    assert G.dtype == torch.float64 and G.shape == (T, T)
    # the products are exact in float64; only the summation order differs
    torch.testing.assert_close(G, ref.task_vector_cosine(base, thetas, gram=True), rtol=1e-12, atol=1e-300)
    assert torch.equal(G, G.T)


@pytest.mark.parametrize("d", [1, 2, 127])
@pytest.mark.parametrize("T", [1, 3, 9])
def test_cosine_on_this_backend_is_the_formula(device, small_chunks, d, T):
    base, thetas = make_tasks(d, T, device, seed=d * 5 + T)
    C = fastmerge.task_vector_cosine(base, thetas, backend="triton")
    assert C.dtype == torch.float64 and C.shape == (T, T)
    torch.testing.assert_close(C.cpu(), cosine_formula(base, thetas), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_gram_dtypes(device, dtype):
    base, thetas = make_tasks(3001, 4, device, dtype=dtype, seed=5)
    G = TV.gram(base, thetas)
    torch.testing.assert_close(G, ref.task_vector_cosine(base, thetas, gram=True), rtol=1e-12, atol=1e-300)


def test_gram_strided_stacked_and_deterministic(device, small_chunks):
    base, thetas = make_tasks(4099, 5, device, seed=2)
    G = TV.gram(base, thetas)
    torch.testing.assert_close(G, ref.task_vector_cosine(base, thetas, gram=True), rtol=1e-12, atol=1e-300)
    assert torch.equal(TV.gram(base, thetas), G)  # two runs: bit-identical
    assert torch.equal(TV.gram(strided(base), [strided(x) for x in thetas]), G)
    assert torch.equal(TV.gram(base, list(torch.stack(thetas).unbind(0))), G)


def cosine(base, thetas):
    return fastmerge.task_vector_cosine(base, thetas, backend="triton").cpu()


def test_zero_task_vector_cosine_zero_never_nan(device):
    base, thetas = make_tasks(1000, 3, device, seed=1)
    thetas[1] = base.clone()
    C = cosine(base, thetas)
    assert not torch.isnan(C).any()
    assert torch.equal(C[1], torch.zeros(3, dtype=torch.float64)) and torch.equal(C[:, 1], C[1])
    assert C[0, 0] == 1.0 and C[2, 2] == 1.0
    torch.testing.assert_close(C, cosine_formula(base, thetas), rtol=1e-12, atol=1e-12)
    # hand-worked: opposite vectors -1 exactly (never beyond), orthogonal 0, (1, 0) and (1, 1) 1/sqrt(2)
    z = torch.zeros(4, device=device)
    v = torch.tensor([1.0, 2, 3, 4], device=device)
    C2 = cosine(z, [v, -v, torch.tensor([2.0, -1, 0, 0], device=device), 3 * v])
    assert C2[0, 1] == -1.0 and C2[1, 0] == -1.0 and C2[1, 3] == -1.0
    assert C2[0, 2] == 0.0 and C2[2, 0] == 0.0
    assert C2[0, 3] == 1.0 and bool((C2.diagonal() == 1.0).all())
    C3 = cosine(torch.zeros(2, device=device), [torch.tensor([1.0, 0.0], device=device),
                                                 torch.tensor([1.0, 1.0], device=device)])
    assert abs(float(C3[0, 1]) - 0.5 ** 0.5) <= 1e-15
    assert torch.equal(TV.gram(base, [base.clone()]), torch.zeros(1, 1, dtype=torch.float64, device=device))


# ---------------------------------------------------------------- block_scale

@pytest.mark.parametrize("kind", ["one", "tensors", "rows", "singles", "empty"])
@pytest.mark.parametrize("d", [1, 2, 31, 257, 1021])
@pytest.mark.parametrize("T", [1, 3, 8])
def test_block_scale_forward_and_backward(device, small_chunks, kind, d, T):
    if kind == "singles" and d > 257:
        pytest.skip("one block per entry: kept small")
    base, vecs = make_tasks(d, T, device, seed=d + T)
    off = blocks(d, kind)
    B = off.numel() - 1
    coefs = torch.randn(T, B, generator=torch.Generator().manual_seed(1)).to(device)
    out = BS.block_scale(base, vecs, coefs, off)
    assert torch.equal(out, ref.block_scale(base, vecs, coefs, off))
    grad = torch.randn(d, generator=torch.Generator().manual_seed(d)).to(device)
    gc = BS.block_scale_backward(grad, vecs, coefs, off)
    _, gr = ref.block_scale_backward(grad, vecs, coefs.double(), off)
    assert gc.dtype == torch.float64 and gc.shape == (T, B)
    torch.testing.assert_close(gc, gr, rtol=1e-12, atol=1e-12)
    empty = (off[1:] == off[:-1]).nonzero().flatten().tolist()
    for b in empty:
        assert torch.equal(gc[:, b], torch.zeros(T, dtype=torch.float64, device=device))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("coef_dtype", [torch.float32, torch.float64])
def test_block_scale_dtypes(device, dtype, coef_dtype):
    d, T = 2003, 3
    base, vecs = make_tasks(d, T, device, dtype=dtype, seed=4)
    off = torch.tensor([0, 1, 1000, 1000, 1600, d])
    coefs = torch.randn(T, 5, dtype=coef_dtype).to(device)
    out = BS.block_scale(base, vecs, coefs, off)
    assert out.dtype == dtype
    assert torch.equal(out, ref.block_scale(base, vecs, coefs, off))
    grad = torch.randn(d).to(dtype).to(device)
    gc = BS.block_scale_backward(grad, vecs, coefs, off)
    _, gr = ref.block_scale_backward(grad, vecs, coefs.double(), off)
    torch.testing.assert_close(gc, gr, rtol=1e-12, atol=1e-12)
    assert torch.equal(gc[:, 2], torch.zeros(T, dtype=torch.float64, device=device))


@pytest.mark.parametrize("d", [1021, 1024])
def test_block_scale_strided_stacked_and_deterministic(device, small_chunks, d):
    T = 4
    base, vecs = make_tasks(d, T, device, seed=7)
    off = torch.tensor([0, 16, 512, d])  # 16-aligned offsets: the vector-load path when d = 1024
    coefs = torch.randn(T, 3).to(device)
    grad = torch.randn(d).to(device)
    out = BS.block_scale(base, vecs, coefs, off)
    gc = BS.block_scale_backward(grad, vecs, coefs, off)
    assert torch.equal(out, ref.block_scale(base, vecs, coefs, off))
    torch.testing.assert_close(gc, ref.block_scale_backward(grad, vecs, coefs.double(), off)[1], rtol=1e-12, atol=1e-12)
    assert torch.equal(BS.block_scale(base, vecs, coefs, off), out)
    assert torch.equal(BS.block_scale_backward(grad, vecs, coefs, off), gc)  # bit-identical
    rows = list(torch.stack(vecs).unbind(0))
    assert torch.equal(BS.block_scale(strided(base), [strided(v) for v in vecs], coefs, off), out)
    assert torch.equal(BS.block_scale(base, rows, coefs, off), out)
    assert torch.equal(BS.block_scale_backward(strided(grad), [strided(v) for v in vecs], coefs, off), gc)
    assert torch.equal(BS.block_scale_backward(grad, rows, coefs, off), gc)
    # coefficients given as a strided view
    assert torch.equal(BS.block_scale(base, vecs, coefs.t().contiguous().t(), off), out)


# ---------------------------------------------------------------- non-finite inputs

NONFINITE = [float("nan"), float("inf"), float("-inf")]


def _msg(name, index, value):
    return f"{name} contains a non-finite value ({value}) at index {index}"


@pytest.mark.parametrize("value", NONFINITE)
def test_nonfinite_raise_with_cpu_messages(device, value):
    d, T = 1021, 3
    base, thetas = make_tasks(d, T, device, seed=9)
    vstr = "nan" if value != value else ("inf" if value > 0 else "-inf")
    off = torch.tensor([0, 100, 100, d])
    coefs = torch.ones(T, 3, device=device)
    grad = torch.randn(d).to(device)

    def poisoned(xs, t, i):
        ys = [x.clone() for x in xs]
        ys[t][i] = value
        return ys

    for t, i in ((0, 0), (2, 1020), (1, 517)):
        bad = poisoned(thetas, t, i)
        name = f"thetas[{t}]"
        with pytest.raises(ValueError) as e:
            UA.uniform_average(bad, [1.0] * T)
        assert str(e.value) == _msg(name, i, vstr)
        with pytest.raises(ValueError) as e:
            TA.task_arithmetic(base, bad, [0.5] * T)
        assert str(e.value) == _msg(name, i, vstr)
        with pytest.raises(ValueError) as e:
            TV.gram(base, bad)
        assert str(e.value) == _msg(name, i, vstr)
        with pytest.raises(ValueError) as e:
            BS.block_scale(base, bad, coefs, off)
        assert str(e.value) == _msg(f"vectors[{t}]", i, vstr)
        with pytest.raises(ValueError) as e:
            BS.block_scale_backward(grad, bad, coefs, off)
        assert str(e.value) == _msg(f"vectors[{t}]", i, vstr)

    bb = poisoned([base], 0, 333)[0]
    for fn in (lambda: TA.task_arithmetic(bb, thetas, [0.5] * T), lambda: TV.gram(bb, thetas),
               lambda: BS.block_scale(bb, thetas, coefs, off)):
        with pytest.raises(ValueError) as e:
            fn()
        assert str(e.value) == _msg("base", 333, vstr)
    gb = poisoned([grad], 0, 5)[0]
    with pytest.raises(ValueError) as e:
        BS.block_scale_backward(gb, thetas, coefs, off)
    assert str(e.value) == _msg("grad", 5, vstr)
    # a coefficient of an empty block is checked too (flat index into [T, B]), before the data
    cb = coefs.clone()
    cb[1, 1] = value
    with pytest.raises(ValueError) as e:
        BS.block_scale(bb, thetas, cb, off)
    assert str(e.value) == _msg("coefs", 4, vstr)
    # a later task's value is reported when the earlier ones are finite; first index wins
    late = poisoned(poisoned(thetas, 2, 900), 2, 17)
    with pytest.raises(ValueError) as e:
        TV.gram(base, late)
    assert str(e.value) == _msg("thetas[2]", 17, vstr)


def test_nonfinite_in_a_later_task_group(device):
    base, vecs = make_tasks(2001, 11, device, seed=3)
    vecs[10][1999] = float("nan")
    with pytest.raises(ValueError, match=r"thetas\[10\] contains a non-finite value \(nan\) at index 1999"):
        TV.gram(base, vecs)
    with pytest.raises(ValueError, match=r"vectors\[10\] contains a non-finite value \(nan\) at index 1999"):
        BS.block_scale_backward(torch.randn(2001).to(device), vecs, torch.ones(11, 2, device=device),
                                torch.tensor([0, 5, 2001]))


def test_large_finite_values_do_not_raise(device):
    # an overflow of finite inputs is not an input error: inf comes out, nothing raises
    x = torch.full((37,), 3.0e38, device=device)
    out = TA.task_arithmetic(torch.zeros_like(x), [x, x], [1.0, 1.0])
    assert torch.isinf(out).all()
