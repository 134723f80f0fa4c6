"""Every bad input named in the design raises a clear ValueError/TypeError, on every backend."""

from __future__ import annotations

import math

import pytest
import torch

import fastmerge
from fastmerge import _cuda
from conftest import make_tasks

# the CUDA kernels join in where they run on CPU tensors, in the emulator (FASTMERGE_CUDA_EMULATE=1)
BACKENDS = ["cpu", "reference"] + (["cuda"] if _cuda.EMULATED and _cuda.AVAILABLE else [])


@pytest.fixture
def data():
    return make_tasks(101, 3, seed=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_task_list(backend, data):
    base, _ = data
    with pytest.raises(ValueError, match="thetas is empty"):
        fastmerge.uniform_average([], backend=backend)
    with pytest.raises(ValueError, match="thetas is empty"):
        fastmerge.merge_ties(base, [], backend=backend)
    with pytest.raises(ValueError, match="vectors is empty"):
        fastmerge.block_scale(base, [], torch.zeros(0, 1), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mismatched_shapes_dtypes_devices(backend, data):
    base, thetas = data
    with pytest.raises(ValueError, match=r"mismatched shapes: thetas\[1\]"):
        fastmerge.task_arithmetic(base, [thetas[0], thetas[1][:-1]], backend=backend)
    with pytest.raises(ValueError, match=r"mismatched dtypes: thetas\[2\]"):
        fastmerge.merge_ties(base, [thetas[0], thetas[1], thetas[2].double()], backend=backend)
    with pytest.raises(ValueError, match=r"mismatched shapes: thetas\[0\]"):
        fastmerge.task_vector_cosine(base[:50], thetas, backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        fastmerge.uniform_average([torch.arange(5), torch.arange(5)], backend=backend)
    meta = torch.empty(101, device="meta")
    with pytest.raises(ValueError, match="mismatched devices"):
        fastmerge.task_arithmetic(base, [thetas[0], meta], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("density", [0.0, -0.1, 1.0001, math.nan, 2])
def test_density_outside_range(backend, density, data):
    base, thetas = data
    with pytest.raises(ValueError, match="density must be in"):
        fastmerge.merge_ties(base, thetas, density=density, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_modes(backend, data):
    base, thetas = data
    with pytest.raises(ValueError, match="unknown merge mode 'median'"):
        fastmerge.merge_ties(base, thetas, merge="median", backend=backend)
    with pytest.raises(ValueError, match="unknown scope"):
        fastmerge.merge_ties(base, thetas, scope="layer", backend=backend)
    with pytest.raises(ValueError, match="needs layout"):
        fastmerge.merge_ties(base, thetas, scope="tensor", backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        fastmerge.uniform_average(thetas, backend="fortran")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_weights_and_lambdas(backend, data):
    base, thetas = data
    with pytest.raises(ValueError, match=r"weights\[1\] must be > 0"):
        fastmerge.merge_ties(base, thetas, weights=[1.0, 0.0, 1.0], backend=backend)
    with pytest.raises(ValueError, match="weights has 2 entries but there are 3 tasks"):
        fastmerge.uniform_average(thetas, weights=[1, 2], backend=backend)
    with pytest.raises(ValueError, match="weights sum to zero"):
        fastmerge.uniform_average(thetas, weights=[0, 0, 0], backend=backend)
    with pytest.raises(ValueError, match=r"lam\[0\] is not finite"):
        fastmerge.task_arithmetic(base, thetas, lam=float("inf"), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("blocks,msg", [
    ([1, 101], "first offset is 1"),
    ([0, 100], "last offset is 100"),
    ([0, 60, 50, 101], "offsets decrease at block 1"),
    ([0], "at least two offsets"),
    (torch.tensor([0.0, 101.0]), "int64 offsets"),
    (torch.tensor([[0, 101]]), "1-D"),
])
def test_blocks_that_do_not_tile(backend, blocks, msg, data):
    base, thetas = data
    B = max(1, (len(blocks) if not isinstance(blocks, torch.Tensor) else blocks.numel()) - 1)
    with pytest.raises(ValueError, match=msg):
        fastmerge.block_scale(base, thetas, torch.ones(3, B), blocks, backend=backend)
    with pytest.raises(ValueError, match=msg.replace("blocks", "layout")):
        fastmerge.merge_ties(base, thetas, scope="tensor", layout=blocks, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_coefs_shape(backend, data):
    base, thetas = data
    with pytest.raises(ValueError, match=r"coefs has shape \(3, 2\); expected \[T, B\] = \[3, 1\]"):
        fastmerge.block_scale(base, thetas, torch.ones(3, 2), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_inputs_name_task_and_index(backend, bad, data):
    base, thetas = data
    thetas = [x.clone() for x in thetas]
    thetas[2][57] = bad
    text = "nan" if math.isnan(bad) else ("inf" if bad > 0 else "-inf")
    pat = rf"thetas\[2\] contains a non-finite value \({text}\) at index 57"
    with pytest.raises(ValueError, match=pat):
        fastmerge.uniform_average(thetas, backend=backend)
    with pytest.raises(ValueError, match=pat):
        fastmerge.task_arithmetic(base, thetas, 0.5, backend=backend)
    with pytest.raises(ValueError, match=pat):
        fastmerge.merge_ties(base, thetas, backend=backend)
    with pytest.raises(ValueError, match=pat):
        fastmerge.task_vector_cosine(base, thetas, backend=backend)
    with pytest.raises(ValueError, match=pat.replace("thetas", "vectors")):
        fastmerge.block_scale(base, thetas, torch.ones(3, 1), backend=backend)
    b2 = base.clone()
    b2[3] = bad
    with pytest.raises(ValueError, match=rf"base contains a non-finite value \({text}\) at index 3"):
        fastmerge.merge_ties(b2, data[1], backend=backend)
    with pytest.raises(ValueError, match=r"coefs contains a non-finite value"):
        fastmerge.block_scale(base, data[1], torch.tensor([[1.0], [bad], [1.0]]), backend=backend)


def test_nonfinite_found_in_large_inputs_and_in_16_bit(data):
    # in the streaming pass of a large problem (sampled bracket path) and in bf16
    base, thetas = make_tasks(1_100_000, 2, seed=1)
    thetas[1][1_099_999] = math.nan
    with pytest.raises(ValueError, match=r"thetas\[1\] contains a non-finite value \(nan\) at index 1099999"):
        fastmerge.merge_ties(base, thetas)
    b16, t16 = make_tasks(1000, 2, dtype=torch.bfloat16)
    t16[0][999] = math.inf
    with pytest.raises(ValueError, match=r"thetas\[0\] contains a non-finite value \(inf\) at index 999"):
        fastmerge.task_vector_cosine(b16, t16)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_ties_pass_finds_nonfinite_anywhere(bad):
    # A problem of 100_003 entries takes the sampled-bracket path, so the streaming merge pass has
    # to find the value (in a full vector, at a chunk edge and in the last, partial vector).
    text = "nan" if math.isnan(bad) else ("inf" if bad > 0 else "-inf")
    for pos in (5, 511, 512, 70_000, 100_002):
        for t in (0, 3):
            base, thetas = make_tasks(100_003, 4, seed=pos + t)
            thetas[t][pos] = bad
            with pytest.raises(ValueError, match=rf"thetas\[{t}\] contains a non-finite value \({text}\) at index {pos}"):
                fastmerge.merge_ties(base, thetas)


def test_ties_overflow_of_finite_inputs():
    # theta - base overflowing is an error; a sum of finite kept entries that overflows is not: the
    # reference gives the same infinity.
    base, thetas = torch.zeros(100_003), [torch.zeros(100_003) for _ in range(3)]
    base[7], thetas[1][7] = -3e38, 3e38
    with pytest.raises(ValueError, match="overflowed to infinity"):
        fastmerge.merge_ties(base, thetas)
    base = torch.zeros(100_003)
    for t in range(3):
        thetas[t].normal_(0, 1e-3)
        thetas[t][9] = 3e38
    got = fastmerge.merge_ties(base, thetas, merge="sum")
    want = fastmerge.merge_ties(base, thetas, merge="sum", backend="reference")
    assert math.isinf(got[9].item()) and torch.equal(got, want)


def test_single_tensor_must_be_stacked():
    with pytest.raises(ValueError, match=r"must be \[T, d\]"):
        fastmerge.uniform_average(torch.ones(5))
    with pytest.raises(TypeError, match="list of tensors"):
        fastmerge.uniform_average("abc")
