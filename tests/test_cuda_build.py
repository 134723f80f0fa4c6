"""The CUDA extension fastmerge._C_cuda: built and registered (runs without a GPU), and, where a GPU
is present, each op against the reference on awkward inputs (marked cuda)."""

from __future__ import annotations

import os

import pytest
import torch

import fastmerge

from fastmerge import _cuda
from fastmerge import reference as ref
from conftest import make_tasks

SCHEMAS = {
    "uniform_average": "uniform_average(Tensor[] thetas, float[] weights) -> Tensor",
    "task_arithmetic": "task_arithmetic(Tensor base, Tensor[] thetas, float[] lam) -> Tensor",
    "gram": "gram(Tensor base, Tensor[] thetas) -> Tensor",
    "block_scale": "block_scale(Tensor base, Tensor[] vectors, Tensor coefs, Tensor offsets) -> Tensor",
    "block_scale_backward": "block_scale_backward(Tensor grad, Tensor[] vectors, Tensor coefs, Tensor offsets) -> Tensor",
    "merge_ties": ("merge_ties(Tensor base, Tensor[] thetas, float density, float lam, int mode, Tensor offsets, "
                   "float[]? weights, int strategy) -> Tensor"),
}


def _need_extension():
    if _cuda.AVAILABLE:
        return
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build: the CUDA extension is not built")
    if os.environ.get("FASTMERGE_CUDA", "auto").strip() == "0":
        pytest.skip("FASTMERGE_CUDA=0: the CUDA extension was not built")
    pytest.fail(f"fastmerge._C_cuda should have been built here but does not import: {_cuda.ERROR!r}")


def test_extension_imports():
    _need_extension()
    archs = _cuda.built_archs()
    assert archs and all(a.strip() for a in archs.split(";")), archs


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_and_cuda_kernel(name):
    _need_extension()
    op = getattr(torch.ops.fastmerge_cuda, name)
    schema = str(op.default._schema)
    assert schema == "fastmerge_cuda::" + SCHEMAS[name], schema
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmerge_cuda::{name}", "CUDA")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmerge_cuda::{name}", "CPU")


def test_cpu_tensors_find_no_kernel():
    _need_extension()
    with pytest.raises(NotImplementedError, match=r"Could not run 'fastmerge_cuda::gram' with arguments from the 'CPU' "
                                                  r"backend"):
        torch.ops.fastmerge_cuda.gram(torch.zeros(3), [torch.zeros(3)])


# ---------------------------------------------------------------- on a GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
OPS = torch.ops.fastmerge_cuda if _cuda.AVAILABLE else None
MODES = {"mean": 0, "sum": 1, "max": 2}
SIZES = [1, 2, 3, 7, 127, 257, 4099, 8191, 8193, 65537]


def _bits(x):
    return x.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def _same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(_bits(a.cpu()), _bits(b.cpu()))


def _within_one_ulp(a, b):
    """At most one representable step apart (±0 count as one value): the elementwise kernels keep the
    reference's operation order without fused multiply-adds, and one ulp is all that a device
    conversion rounding differently could add."""
    assert a.dtype == b.dtype and a.shape == b.shape
    keys = []
    for x in (a.cpu(), b.cpu()):
        v = _bits(x.reshape(-1)).long()
        mag = v & ((1 << (8 * x.element_size() - 1)) - 1)
        keys.append(torch.where(v < 0, -mag, mag))  # the floats' order, one apart per step
    ka, kb = keys
    same_sign = (ka >= 0) == (kb >= 0)
    close = torch.where(same_sign, (ka - kb).abs() <= 1, (ka.abs() + kb.abs() <= 1) & (ka.abs() <= 1) & (kb.abs() <= 1))
    assert bool(close.all()), f"{int((~close).sum())} entries more than one ulp apart"


def _gpu(xs, step=1):
    """CUDA copies; step > 1 gives non-contiguous 1-D views of the same values."""
    out = []
    for x in xs:
        buf = torch.zeros(x.numel() * step, dtype=x.dtype, device="cuda")
        buf[::step] = x.cuda()
        out.append(buf[::step])
    return out


def _ties(base, thetas, density, merge="mean", lam=1.0, layout=None, weights=None, step=1):
    d = base.numel()
    off = torch.tensor([0, d] if layout is None else layout, dtype=torch.int64)
    g = _gpu([base] + list(thetas), step)
    out = OPS.merge_ties(g[0], g[1:], density, lam, MODES[merge], off, weights, 0)
    expect = ref.merge_ties(base, thetas, density=density, lam=lam, merge=merge,
                            scope="global" if layout is None else "tensor", layout=layout, weights=weights)
    _same_bits(out, expect)
    return out


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("merge", sorted(MODES))
def test_ties_sizes(d, merge):
    base, thetas = make_tasks(d, 4, seed=d)
    _ties(base, thetas, 0.2, merge)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("density", [1.0, 0.5, 0.2, 1e-6])
def test_ties_dtypes_densities_strides(dtype, density):
    base, thetas = make_tasks(5003, 5, dtype=dtype, seed=3)
    _ties(base, thetas, density, "mean", lam=0.7, step=3)
    _ties(base, thetas, density, "max", weights=[0.5, 1.0, 2.0, 1.5, 3.0])
    _ties(base, thetas, density, "sum", layout=[0, 0, 1, 1000, 1001, 4000, 5003])


@cuda
@pytest.mark.cuda
def test_ties_ties_zeros_cancellations_and_many_tasks():
    base = torch.zeros(1000)
    x = torch.tensor([1.0, -1.0, 0.5, 2.0] * 250)
    y = torch.tensor([-1.0, 1.0, 1.0, 1.0] * 250)
    for merge in MODES:
        _ties(base, [x, y], 0.3, merge)               # many ties at the threshold
        _ties(base, [x, -x], 1.0, merge)              # everything cancels: majority 0
        _ties(base, [x, y, torch.zeros(1000)], 1.0, merge)  # an all-zero task
    b = torch.tensor([0.0, -0.0, 1.0, -0.0, 2.0, -3.0, 0.0])
    _ties(b, [b.clone(), b + torch.tensor([0.5, -0.0, -1.0, 0.0, 0.25, 1.0, -2.0])], 0.5, "max")
    base, thetas = make_tasks(3001, 40, seed=5)       # T above the per-thread register array
    _ties(base, thetas, 0.3, "mean")
    # more exact cancellations than the listed capacity: the full-pass fallback
    big = torch.randint(-3, 4, (600_000,), generator=torch.Generator().manual_seed(0)).float()
    few = torch.zeros(600_000)
    few[:1000] = 1.0  # a positive majority decided by a few entries
    _ties(torch.zeros(600_000), [big, -big, few], 1.0, "mean")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_elementwise_gram_block_scale(dtype):
    for d in [1, 2, 257, 65537]:
        # task vectors of order 1: a dropped term or a wrong weight moves the result by many ulps
        base, thetas = make_tasks(d, 3, dtype=dtype, seed=d, scale=100.0)
        g = _gpu([base] + thetas, step=2)
        w = [0.5, 1.0, 2.0]
        _within_one_ulp(OPS.uniform_average(g[1:], w), ref.uniform_average(thetas, w))
        _within_one_ulp(OPS.task_arithmetic(g[0], g[1:], w), ref.task_arithmetic(base, thetas, w))
        G = OPS.gram(g[0], g[1:])
        torch.testing.assert_close(G.cpu(), ref.task_vector_cosine(base, thetas, gram=True), rtol=1e-9, atol=1e-12)
        _same_bits(G, OPS.gram(g[0], g[1:]))  # deterministic
        off = [0, 0, d // 3, d // 3, d]
        coefs = torch.randn(3, 4, dtype=torch.float32, generator=torch.Generator().manual_seed(d))
        out = OPS.block_scale(g[0], g[1:], coefs.cuda(), torch.tensor(off))
        _within_one_ulp(out, ref.block_scale(base, thetas, coefs, off))
        gc = OPS.block_scale_backward(g[0], g[1:], coefs.cuda(), torch.tensor(off))
        _, expect = ref.block_scale_backward(base, thetas, coefs.double(), off)
        torch.testing.assert_close(gc.cpu(), expect, rtol=1e-9, atol=1e-12)
    # hand-worked values, exact in every dtype: (1 + 2*2 + 4) / 4 = 2.25 and (-3 + 2*0.5 + 1.5) / 4 = -0.125;
    # base (1, -2) + 0.5*(1, 2) + 2*(-0.5, 1) = (0.5, 1)
    x = _gpu([torch.tensor(v, dtype=dtype) for v in ([1.0, -3.0], [2.0, 0.5], [4.0, 1.5])])
    _same_bits(OPS.uniform_average(x, [1.0, 2.0, 1.0]), torch.tensor([2.25, -0.125], dtype=dtype))
    _same_bits(OPS.uniform_average([v[:1] for v in x[:2]], [1.0, 3.0]), torch.tensor([1.75], dtype=dtype))
    b = _gpu([torch.tensor(v, dtype=dtype) for v in ([1.0, -2.0], [2.0, 0.0], [0.5, -1.0])])
    _same_bits(OPS.task_arithmetic(b[0], b[1:], [0.5, 2.0]), torch.tensor([0.5, 1.0], dtype=dtype))
    _same_bits(OPS.task_arithmetic(b[0][1:], [v[1:] for v in b[1:]], [0.25, 0.25]), torch.tensor([-1.25], dtype=dtype))


@cuda
@pytest.mark.cuda
def test_nonfinite_inputs_are_named():
    base, thetas = make_tasks(1000, 2, seed=1)
    thetas[1][517] = float("nan")
    g = _gpu([base] + thetas)
    off = torch.tensor([0, 1000])
    # the raw op notes the NaN and returns; the Python layer names the input and index
    OPS.gram(g[0], g[1:])
    assert fastmerge._cuda.take_nonfinite() and not fastmerge._cuda.take_nonfinite()
    with pytest.raises(ValueError, match=r"thetas\[1\] contains a non-finite value \(nan\) at index 517"):
        fastmerge.merge_ties(g[0], g[1:], backend="cuda")
    with pytest.raises(ValueError, match=r"thetas\[1\] contains a non-finite value \(nan\) at index 517"):
        fastmerge.task_vector_cosine(g[0], g[1:], backend="cuda")
    with pytest.raises(ValueError, match=r"vectors\[1\] contains a non-finite value"):
        fastmerge._ops.block_scale_backward_op(g[0], g[1:], torch.zeros(2, 1, device="cuda"), off, "cuda")
    coefs = torch.ones(2, 1, device="cuda")
    coefs[1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"coefs contains a non-finite value \(inf\) at index 1"):
        fastmerge.block_scale(g[0], [g[1], g[1]], coefs, blocks=off, backend="cuda")
