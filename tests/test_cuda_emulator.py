"""The CPU emulator of the CUDA execution model (fastmerge._C_cuda_emu, FASTMERGE_CUDA_EMULATE=1).

tests/test_gpu.py runs the CUDA kernels through it; this file checks the emulated installation
itself and that no kernel result depends on the order in which blocks and threads run: under
FASTMERGE_CUDA_EMULATE_ORDER=reverse the emulator runs the blocks, and the threads between two
barriers, last to first, which changes the result of a race or of an order-dependent reduction.
Skipped unless fastmerge was imported with FASTMERGE_CUDA_EMULATE=1 and the emulator is built.
"""

from __future__ import annotations

import pytest
import torch

import fastmerge
from fastmerge import _cuda
from fastmerge import reference as ref
from conftest import make_tasks, strided

pytestmark = pytest.mark.skipif(not _cuda.EMULATED, reason="needs FASTMERGE_CUDA_EMULATE=1")


def bits(x):
    return x.reshape(-1).view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def test_emulated_installation():
    # asked for but missing fails here, instead of every emulated test skipping
    assert _cuda.AVAILABLE, (f"FASTMERGE_CUDA_EMULATE=1 but the emulator does not load ({_cuda.ERROR}); "
                             f"{_cuda.BUILD_HINT}")
    assert _cuda.built_archs() == "emulated"
    assert "cuda" in fastmerge.available_backends("cpu")
    assert fastmerge._ops.resolve_backend(None, torch.device("cpu")) == "cpu"  # never chosen by default
    for name in ("uniform_average", "task_arithmetic", "gram", "block_scale", "block_scale_backward", "merge_ties"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmerge_cuda_emu::{name}", "CPU")


needs_emulator = pytest.mark.skipif(not _cuda.AVAILABLE, reason="the emulator is not built")


@needs_emulator
def test_cuda_backend_refuses_other_devices():
    x = torch.zeros(4, device="meta")
    with pytest.raises(ValueError, match="runs in the CPU emulator"):
        fastmerge.task_arithmetic(x, [x], 0.5, backend="cuda")


@needs_emulator
def test_kernel_checks_name_the_input():
    base, th = make_tasks(10, 2)
    with pytest.raises(ValueError, match=r"mismatched shapes: thetas\[1\] has 9 elements"):
        _cuda.ops().merge_ties(base, [th[0], th[1][:9]], 0.2, 1.0, 0, torch.tensor([0, 10]), None, 0)


def _coefs(T):
    return torch.randn(T, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(T))


def _grad(d):
    return torch.randn(d, generator=torch.Generator().manual_seed(d))


def _blocks(d):
    return [0, 5, d // 2, d]


def _layout(d):
    return [0, 1, 9000, d]


def _all_ops(d: int, T: int):
    base, th = make_tasks(d, T, seed=11)
    th[1][: d // 4] = 2 * base[: d // 4] - th[0][: d // 4]  # exact TIES cancellations with task 0
    coefs, blocks, g, layout = _coefs(T), _blocks(d), _grad(d), _layout(d)
    return base, th, {
        "average": lambda: fastmerge.uniform_average(th, weights=list(range(1, T + 1)), backend="cuda"),
        "task_arithmetic": lambda: fastmerge.task_arithmetic(strided(base), th, 0.3, backend="cuda"),
        "gram": lambda: fastmerge.task_vector_cosine(base, th, gram=True, backend="cuda"),
        "gram_many_tasks": lambda: fastmerge.task_vector_cosine(base, th * 4, gram=True, backend="cuda"),
        "block_scale": lambda: fastmerge.block_scale(base, th, coefs.float(), blocks=blocks, backend="cuda"),
        "block_scale_backward": lambda: fastmerge._ops.block_scale_backward_op(g, th, coefs, torch.tensor(blocks),
                                                                               "cuda"),
        "ties": lambda: fastmerge.merge_ties(base, th, density=0.2, backend="cuda"),
        "ties_tensor": lambda: fastmerge.merge_ties(base, th, density=0.3, merge="max", scope="tensor", layout=layout,
                                                    backend="cuda"),
        "ties_many_tasks": lambda: fastmerge.merge_ties(base, th * 5, density=0.1, backend="cuda"),
    }


@needs_emulator
def test_results_do_not_depend_on_block_or_thread_order(monkeypatch):
    base, th, calls = _all_ops(40_009, 7)
    forward = {k: f() for k, f in calls.items()}
    monkeypatch.setenv("FASTMERGE_CUDA_EMULATE_ORDER", "reverse")
    for k, f in calls.items():
        assert torch.equal(bits(f()), bits(forward[k])), k
    # and the results are the reference's: bit for bit where the reference keeps the kernels'
    # operation order, to the last bits of a float64 sum where the order of the sum differs
    T, d = len(th), base.numel()
    same = {"average": ref.uniform_average(th, weights=list(range(1, T + 1))),
            "task_arithmetic": ref.task_arithmetic(base, th, 0.3),
            "block_scale": ref.block_scale(base, th, _coefs(T).float(), _blocks(d)),
            "ties": ref.merge_ties(base, th, density=0.2),
            "ties_tensor": ref.merge_ties(base, th, density=0.3, merge="max", scope="tensor", layout=_layout(d))}
    for k, expect in same.items():
        assert torch.equal(bits(forward[k]), bits(expect)), k
    G, Gr = forward["gram"], ref.task_vector_cosine(base, th, gram=True)
    scale = torch.sqrt(torch.outer(Gr.diagonal(), Gr.diagonal()))  # a dot product's error scales with the norms
    assert bool(((G - Gr).abs() <= 1e-12 * scale).all())
    _, gc = ref.block_scale_backward(_grad(d), th, _coefs(T), _blocks(d))
    torch.testing.assert_close(forward["block_scale_backward"], gc, rtol=1e-12, atol=1e-12)


@needs_emulator
def test_emulator_shuffles_barriers_and_errors(monkeypatch):
    selftest = _cuda.ops().emulator_selftest
    expect = []
    for block in range(2):
        warps = [sum(block * 1000 + w * 32 + lane for lane in range(32)) for w in range(8)]
        expect += warps + [sum(warps)]
    assert selftest(0).tolist() == expect
    monkeypatch.setenv("FASTMERGE_CUDA_EMULATE_ORDER", "reverse")
    assert selftest(0).tolist() == expect
    monkeypatch.delenv("FASTMERGE_CUDA_EMULATE_ORDER")
    with pytest.raises(RuntimeError, match="deadlocked in block 0: 255 threads wait at __syncthreads"):
        selftest(1)
    with pytest.raises(RuntimeError, match="full-warp mask only"):
        selftest(2)
    assert torch.isnan(selftest(3)).all()  # dynamic shared memory that no thread wrote
    with pytest.raises(RuntimeError, match="invalid block size 1025"):
        selftest(4)
    with pytest.raises(RuntimeError, match="1 threads returned while 255 wait at __syncthreads"):
        selftest(5)
    with pytest.raises(RuntimeError, match=r"wait at different __syncthreads\(\) calls \(lines \d+ and \d+\)"):
        selftest(6)
    with pytest.raises(RuntimeError, match="lane 8 reads thread 16, which has returned"):
        selftest(7)
    assert torch.isnan(selftest(8)).all()  # shared arrays do not carry values from block to block
    with pytest.raises(RuntimeError, match="65536 bytes of dynamic shared memory exceed the 48 KiB"):
        selftest(9)
    assert selftest(0).tolist() == expect  # a failed launch leaves the emulator usable
