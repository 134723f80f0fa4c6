"""torch.library integration (opcheck, torch.compile), dispatch, and the instruction-set builds."""

from __future__ import annotations

import warnings

import pytest
import torch

import fastmerge
from fastmerge import _ops
from fastmerge import reference as ref
from conftest import make_tasks


# TIES worked by hand (density 0.5 keeps |τ| >= the 2nd smallest of each task's four; λ = 0.5):
#   τ_0 = [3, -1, 0.5, 2]  keeps [3, -1, 0, 2];   τ_1 = [-2, -1, 0.25, 1]  keeps [-2, -1, 0, 1]
#   sums [1, -2, 0, 3]: signs [+, -, (0: the majority +), +]; agreeing means [3, -1, 0, 1.5]
#   base + 0.5 * that, with base = 1
_HAND_BASE = torch.ones(4)
_HAND_THETAS = [torch.tensor([4.0, 0.0, 1.5, 3.0]), torch.tensor([-1.0, 0.0, 1.25, 2.0])]
_HAND_TIES = torch.tensor([2.5, 0.5, 1.0, 1.75])


def _count_reference_ties(monkeypatch) -> list:
    """Count the calls that reach the reference twin of merge_ties (the dispatcher looks it up per call)."""
    calls = []
    real = ref.merge_ties
    monkeypatch.setattr(ref, "merge_ties", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _hand_ties():
    return fastmerge.merge_ties(_HAND_BASE, _HAND_THETAS, density=0.5, lam=0.5)


def _op_cases():
    base, thetas = make_tasks(300, 3, seed=0)
    off = torch.tensor([0, 100, 101, 300])
    coefs = torch.randn(3, 3)
    grad = torch.randn(300)
    for be in ("cpu", "reference"):
        yield "uniform_average", (thetas, [1.0, 2.0, 0.5], be)
        yield "task_arithmetic", (base, thetas, [0.3, 0.3, 0.3], be)
        yield "merge_ties", (base, thetas, 0.2, 1.0, "mean", torch.tensor([0, 300]), None, be)
        yield "merge_ties", (base, thetas, 0.5, 0.7, "max", off, [1.0, 2.0, 3.0], be)
        yield "task_vector_cosine", (base, thetas, False, be)
        yield "block_scale", (base, thetas, coefs.clone().requires_grad_(True), off, be)
        yield "block_scale_backward", (grad, thetas, coefs, off, be)


@pytest.mark.parametrize("name,args", list(_op_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(_ops.OPS[name], args)


def test_torch_compile_fullgraph():
    base, thetas = make_tasks(1000, 3, seed=1)
    off = torch.tensor([0, 500, 1000])
    coefs = torch.randn(3, 2, requires_grad=True)

    def fn(b, x0, x1, x2, c):
        avg = fastmerge.uniform_average([x0, x1, x2])
        ta = fastmerge.task_arithmetic(b, [x0, x1, x2], 0.4)
        ties = fastmerge.merge_ties(b, [x0, x1, x2], density=0.3)
        cos = fastmerge.task_vector_cosine(b, [x0, x1, x2])
        bs = fastmerge.block_scale(b, [x0, x1, x2], c, off)
        return avg + ta + ties, cos, bs.square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager = fn(base, *thetas, coefs)
    got = compiled(base, *thetas, coefs)
    torch.testing.assert_close(got[0], eager[0])
    torch.testing.assert_close(got[1], eager[1])
    got[2].backward()
    g1 = coefs.grad.clone()
    coefs.grad = None
    eager[2].backward()
    torch.testing.assert_close(g1, coefs.grad)


def test_backend_selection_and_env(monkeypatch):
    base, thetas = make_tasks(50, 2)
    assert _ops.resolve_backend(None, torch.device("cpu")) == "cpu"
    calls = _count_reference_ties(monkeypatch)
    assert torch.equal(_hand_ties(), _HAND_TIES) and calls == []          # the compiled kernels by default
    monkeypatch.setenv("FASTMERGE_BACKEND", "reference")
    assert _ops.resolve_backend(None, torch.device("cpu")) == "reference"
    assert _ops.resolve_backend("cpu", torch.device("cpu")) == "cpu"
    assert torch.equal(_hand_ties(), _HAND_TIES) and calls == [1]         # the variable sends it to the twin
    assert torch.equal(fastmerge.merge_ties(_HAND_BASE, _HAND_THETAS, 0.5, 0.5, backend="cpu"), _HAND_TIES)
    assert calls == [1]                                                   # the argument overrides the variable
    monkeypatch.setenv("FASTMERGE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend"):
        fastmerge.uniform_average(thetas)
    monkeypatch.delenv("FASTMERGE_BACKEND")
    if not _ops.triton_interpret():
        with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors .*TRITON_INTERPRET=1"):
            fastmerge.uniform_average(thetas, backend="triton")
        assert fastmerge.available_backends("cpu") == ["reference", "cpu"]
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        fastmerge.merge_ties(base, thetas, backend="cuda")
    assert "cpu" in fastmerge.available_backends()


def test_gpu_tensors_without_gpu_kernels_fall_back_with_one_warning(monkeypatch):
    # the dispatch decision for CUDA tensors, checked without a GPU: triton first, then cuda, else a warning
    monkeypatch.delenv("FASTMERGE_BACKEND", raising=False)
    monkeypatch.setattr(_ops, "_warned", set())
    dev = torch.device("cuda")
    monkeypatch.setattr(_ops, "triton_kernels", lambda: object())
    assert _ops.resolve_backend(None, dev) == "triton"
    monkeypatch.setattr(_ops, "triton_kernels", lambda: None)
    monkeypatch.setattr(_ops, "cuda_extension", lambda: object())
    assert _ops.resolve_backend(None, dev) == "cuda"
    monkeypatch.setattr(_ops, "cuda_extension", lambda: None)
    with pytest.warns(RuntimeWarning, match="running the PyTorch reference ops on CUDA tensors"):
        assert _ops.resolve_backend(None, dev) == "reference"
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
        _ops.resolve_backend("cuda", dev)
    with pytest.raises(RuntimeError, match="backend='triton' is unavailable"):
        _ops.resolve_backend("triton", dev)


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    base, thetas = make_tasks(50, 2)
    monkeypatch.setattr(_ops, "_C", None)
    monkeypatch.setattr(_ops, "_C_ERROR", ImportError("simulated"))
    monkeypatch.setattr(_ops, "_warned", set())
    monkeypatch.delenv("FASTMERGE_BACKEND", raising=False)
    calls = _count_reference_ties(monkeypatch)
    with pytest.warns(RuntimeWarning, match="pip install --no-build-isolation"):
        out = _hand_ties()
    assert torch.equal(out, _HAND_TIES) and calls == [1]    # the reference ran, and gave the hand result
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastmerge.merge_ties(base, thetas)  # warned once only
    with pytest.raises(RuntimeError, match="rebuild"):
        fastmerge.merge_ties(base, thetas, backend="cpu")


@pytest.mark.parametrize("cap", ["DEFAULT", "AVX2", "AVX512"])
def test_every_instruction_set_build_matches_reference(cap):
    from fastmerge import _C

    if cap not in _C.cpu_capabilities():
        pytest.skip(f"this CPU cannot run the {cap} build")
    before = _C.cpu_capability()
    _C.set_cpu_capability(cap)
    try:
        assert fastmerge.cpu_capability() == cap
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            base, thetas = make_tasks(70_001, 3, dtype=dtype, seed=5)
            off = torch.tensor([0, 7, 40_000, 70_001])
            coefs = torch.randn(3, 3)
            assert torch.equal(fastmerge.uniform_average(thetas), ref.uniform_average(thetas))
            assert torch.equal(fastmerge.task_arithmetic(base, thetas, 0.3), ref.task_arithmetic(base, thetas, 0.3))
            for merge in ("mean", "sum", "max"):
                assert torch.equal(fastmerge.merge_ties(base, thetas, 0.2, merge=merge),
                                   ref.merge_ties(base, thetas, 0.2, merge=merge))
            assert torch.equal(fastmerge.block_scale(base, thetas, coefs, off), ref.block_scale(base, thetas, coefs, off))
            torch.testing.assert_close(fastmerge.task_vector_cosine(base, thetas, gram=True),
                                       ref.task_vector_cosine(base, thetas, gram=True), rtol=1e-12, atol=0)
        big_b, big_t = make_tasks(1_100_000, 2, seed=6)  # the sampled-bracket path
        assert torch.equal(fastmerge.merge_ties(big_b, big_t), ref.merge_ties(big_b, big_t))
    finally:
        _C.set_cpu_capability(before)


def test_output_cache_reuses_and_frees():
    _, thetas = make_tasks(3_000_000, 2, seed=0)
    a = fastmerge.uniform_average(thetas)
    ptr = a.data_ptr()
    expect = a.clone()
    del a
    b = fastmerge.uniform_average(thetas)
    assert b.data_ptr() == ptr  # the freed block came back from the cache
    assert torch.equal(b, expect)
    del b
    assert fastmerge.empty_cache() > 0
