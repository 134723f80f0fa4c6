"""uniform_average and task_arithmetic: the fused CPU kernels against their reference twins."""

from __future__ import annotations

import pytest
import torch

import fastmerge
from fastmerge import reference as ref
from conftest import AWKWARD_SIZES, assert_rounded_from, make_tasks, strided

FLOATS = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("d", AWKWARD_SIZES)
@pytest.mark.parametrize("T", [1, 2, 5])
def test_uniform_average_matches_reference_fp32(d, T):
    _, thetas = make_tasks(d, T, seed=d + T)
    out = fastmerge.uniform_average(thetas, backend="cpu")
    expect = ref.uniform_average(thetas)
    # same operation order, no fused multiply-add: bit for bit
    assert torch.equal(out, expect)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("d", [1, 2, 257, 4099])
def test_uniform_average_dtypes_and_weights(dtype, d):
    # task vectors of order 1 (not 0.01): a wrong weight moves the result by far more than an ulp
    _, thetas = make_tasks(d, 4, dtype=dtype, seed=3, scale=100.0)
    w = [0.5, 2.0, 0.0, 1.25]
    out = fastmerge.uniform_average(thetas, weights=w, backend="cpu")
    assert out.dtype == dtype
    # same operation order as the twin, no fused multiply-add: bit for bit in every dtype
    assert torch.equal(out, ref.uniform_average(thetas, weights=w))
    # and both are the weighted mean of the inputs, up to rounding
    xs = [x.double() for x in thetas]
    naive = sum(wt * x for wt, x in zip(w, xs)) / sum(w)
    assert_rounded_from(out, naive, sum(wt * x.abs() for wt, x in zip(w, xs)) / sum(w), 2 * len(w) + 2)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("d", [1, 2, 513, 65537])
def test_task_arithmetic_matches_reference(dtype, d):
    base, thetas = make_tasks(d, 3, dtype=dtype, seed=d, scale=100.0)
    for lam in (0.4, [1.0, -0.5, 0.3]):
        out = fastmerge.task_arithmetic(base, thetas, lam=lam, backend="cpu")
        expect = ref.task_arithmetic(base, thetas, lam=lam)
        assert torch.equal(out, expect), (dtype, d, lam)
        lams = [lam] * 3 if isinstance(lam, float) else lam
        b = base.double()
        naive = b + sum(l * (x.double() - b) for l, x in zip(lams, thetas))
        mag = b.abs() + sum(abs(l) * (x.double().abs() + b.abs()) for l, x in zip(lams, thetas))
        assert_rounded_from(out, naive, mag, 3 * len(lams) + 1)


@pytest.mark.parametrize("dtype", FLOATS)
def test_hand_worked_values_every_dtype(dtype):
    # small dyadic numbers: every sum and result is exact in every dtype, so the results are exact
    x = [torch.tensor(v, dtype=dtype) for v in ([1.0, -3.0], [2.0, 0.5], [4.0, 1.5])]
    # (1 + 2*2 + 4) / 4 = 2.25 and (-3 + 2*0.5 + 1.5) / 4 = -0.125; unweighted: 7/3 and -1/3
    out = fastmerge.uniform_average(x, weights=[1.0, 2.0, 1.0], backend="cpu")
    assert torch.equal(out, torch.tensor([2.25, -0.125], dtype=dtype))
    assert torch.equal(fastmerge.uniform_average(x[:1], weights=[3.0], backend="cpu"), x[0])
    assert torch.equal(fastmerge.uniform_average([x[0], x[2]], backend="cpu"), torch.tensor([2.5, -0.75], dtype=dtype))
    # d = 1: (1*1 + 3*2) / 4 = 1.75
    one = [v[:1] for v in x]
    assert torch.equal(fastmerge.uniform_average(one[:2], weights=[1.0, 3.0], backend="cpu"),
                       torch.tensor([1.75], dtype=dtype))
    base = torch.tensor([1.0, -2.0], dtype=dtype)
    t1 = torch.tensor([2.0, 0.0], dtype=dtype)   # task vector (1, 2)
    t2 = torch.tensor([0.5, -1.0], dtype=dtype)  # task vector (-0.5, 1)
    # base + 0.5*(1, 2) + 2*(-0.5, 1) = (0.5, 1); the base alone is (1, -2), without t2 (1.5, -1)
    out = fastmerge.task_arithmetic(base, [t1, t2], lam=[0.5, 2.0], backend="cpu")
    assert torch.equal(out, torch.tensor([0.5, 1.0], dtype=dtype))
    assert torch.equal(fastmerge.task_arithmetic(base[1:], [t1[1:], t2[1:]], lam=0.25, backend="cpu"),
                       torch.tensor([-1.25], dtype=dtype))  # -2 + 0.25*2 + 0.25*1
    # the same from the twin
    assert torch.equal(ref.uniform_average(x, weights=[1.0, 2.0, 1.0]), torch.tensor([2.25, -0.125], dtype=dtype))
    assert torch.equal(ref.task_arithmetic(base, [t1, t2], lam=[0.5, 2.0]), torch.tensor([0.5, 1.0], dtype=dtype))


def test_stacked_input_equals_list_input():
    base, thetas = make_tasks(1021, 4, seed=1)
    stacked = torch.stack(thetas)
    assert torch.equal(fastmerge.uniform_average(stacked), ref.uniform_average(thetas))
    assert torch.equal(fastmerge.task_arithmetic(base, stacked, 0.3), ref.task_arithmetic(base, thetas, 0.3))


def test_non_contiguous_inputs():
    base, thetas = make_tasks(4099, 3, seed=2)
    nb = strided(base, 3)
    nts = [strided(x, 2) for x in thetas]
    assert not nb.is_contiguous()
    expect = ref.uniform_average(thetas)
    assert torch.equal(fastmerge.uniform_average(nts), expect)
    assert torch.equal(fastmerge.task_arithmetic(nb, nts, 0.7), ref.task_arithmetic(base, thetas, 0.7))
    # a [d, T] tensor seen through its transpose: every row is a strided view
    cols = torch.stack(thetas, dim=1)
    assert torch.equal(fastmerge.uniform_average(cols.t()), expect)
    # multi-dimensional tensors keep their shape
    mats = [x.view(4099, 1) for x in thetas]
    assert fastmerge.uniform_average(mats).shape == (4099, 1)


def test_zeros_signed_zeros_and_cancellation():
    a = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.0e38])
    b = torch.tensor([-0.0, -0.0, -1.0, 1.0, 3.0e38])
    out = fastmerge.uniform_average([a, b], backend="cpu")
    expect = ref.uniform_average([a, b])
    assert torch.equal(out, expect)
    assert torch.equal(torch.signbit(out), torch.signbit(expect))


@pytest.mark.parametrize("op", ["uniform_average", "task_arithmetic"])
def test_threads_bit_identical(op):
    base, thetas = make_tasks(300_007, 5, seed=7)
    fn = (lambda: fastmerge.uniform_average(thetas, [1, 2, 3, 4, 5])) if op == "uniform_average" else (
        lambda: fastmerge.task_arithmetic(base, thetas, [0.1, 0.2, 0.3, 0.4, 0.5]))
    torch.set_num_threads(1)
    one = fn()
    torch.set_num_threads(2)
    two = fn()
    assert torch.equal(one, two)


def test_reference_average_is_the_plain_mean():
    thetas = [torch.randn(100) for _ in range(3)]
    torch.testing.assert_close(ref.uniform_average(thetas), torch.stack(thetas).mean(0), rtol=1e-6, atol=1e-6)


PREFETCH_SCRIPT = r"""
import json, torch, fastmerge
g = torch.Generator().manual_seed(3)
d = 2_000_003  # (T + 2) * d * 4 bytes > 64 MiB: large enough to be timed by the prefetch tuner
base = torch.randn(d, generator=g)
thetas = [base + torch.randn(d, generator=g) * 0.01 for _ in range(8)]
coefs = torch.rand(8, 2, generator=g)
blocks = torch.tensor([0, 1_000_001, d])
outs = []
for _ in range(4):
    outs = [fastmerge.uniform_average(thetas), fastmerge.task_arithmetic(base, thetas, 0.3),
            fastmerge.block_scale(base, thetas, coefs, blocks)]
torch.save(outs, OUT)
print(json.dumps(fastmerge.cpu_prefetch_state()))
"""


def test_streaming_prefetch_never_changes_results(tmp_path):
    # software prefetch only moves cache lines: forced on, forced off and the tuned choice agree bit
    # for bit; the tuner settles after three timed runs each way
    import json, os, subprocess, sys
    results, states = {}, {}
    for mode in ("on", "off", "auto"):
        out = tmp_path / f"{mode}.pt"
        env = dict(os.environ, FASTMERGE_CPU_PREFETCH=mode if mode != "auto" else "")
        r = subprocess.run([sys.executable, "-c", PREFETCH_SCRIPT.replace("OUT", repr(str(out)))], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        states[mode] = json.loads(r.stdout.strip().splitlines()[-1])
        results[mode] = torch.load(out)
    for a, b, c in zip(results["on"], results["off"], results["auto"]):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert states["on"]["chosen"] == "on" and states["off"]["chosen"] == "off"
    auto = states["auto"]
    assert auto["mode"] == "auto" and auto["chosen"] in ("on", "off")
    assert auto["runs_on"] >= 3 and auto["runs_off"] >= 3
