"""torch.library schemas of the fastmerge ops, their fake kernels, autograd, and backend dispatch.

Each op takes flat 1-D tensors (the public functions in ``fastmerge/__init__.py`` flatten and
reshape) and a concrete ``backend`` string, resolved before the op is called:

- ``reference``: the pure-PyTorch twins in ``fastmerge.reference``;
- ``cpu``: the fused C++ kernels of ``fastmerge._C`` (CPU tensors);
- ``triton``: the Triton kernels of ``fastmerge.kernels`` (CUDA tensors; also CPU tensors when
  ``TRITON_INTERPRET=1`` was set before the first import of triton, which is how they are tested
  without a GPU);
- ``cuda``: the CUDA C++ kernels of ``fastmerge._C_cuda``, registered for the CUDA dispatch key as
  ``torch.ops.fastmerge_cuda.<name>`` (CUDA tensors; instead CPU tensors when
  ``FASTMERGE_CUDA_EMULATE=1`` was set before fastmerge was imported: the same kernels then run in
  a CPU emulator of the CUDA execution model, which is how they are tested without a GPU).

Default: CPU tensors use ``cpu``, CUDA tensors ``triton`` (``cuda`` when Triton cannot be imported).
When the kernels a default needs are missing, the ``reference`` backend runs instead, with one
warning that says so. ``FASTMERGE_BACKEND`` overrides the default, and so does each function's
``backend=`` argument.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import _validate as V
from . import reference as R

try:  # the extension is optional: a missing build falls back to the reference, loudly
    from . import _C  # type: ignore[attr-defined]

    _C_ERROR: Optional[BaseException] = None
except ImportError as e:  # pragma: no cover - exercised only on broken installs
    _C = None
    _C_ERROR = e

BACKENDS = ("reference", "cpu", "triton", "cuda")

_KERNELS = None
_KERNELS_ERROR: Optional[BaseException] = None


def triton_kernels():
    """The ``fastmerge.kernels`` package (imports triton on first use), or None if unavailable."""
    global _KERNELS, _KERNELS_ERROR
    if _KERNELS is None and _KERNELS_ERROR is None:
        try:
            import fastmerge.kernels as K

            _KERNELS = K
        except Exception as e:  # triton missing or broken: GPU tensors fall back, loudly
            _KERNELS_ERROR = e
    return _KERNELS


def triton_interpret() -> bool:
    """Whether Triton kernels run under the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def cuda_extension():
    """``fastmerge._cuda`` when the CUDA extension was built and loads, else None."""
    try:
        from . import _cuda
    except ImportError:  # pragma: no cover - a source tree without the CUDA loader
        return None
    return _cuda if _cuda.AVAILABLE else None


def cuda_device_type() -> str:
    """The device type the ``cuda`` backend takes: "cuda", or "cpu" under FASTMERGE_CUDA_EMULATE=1."""
    try:
        from . import _cuda
    except ImportError:  # pragma: no cover - a source tree without the CUDA loader
        return "cuda"
    return _cuda.device_type()


_MERGE_CODES = {"mean": 0, "sum": 1, "max": 2}
_warned: set[str] = set()

REBUILD_HINT = "rebuild it with: pip install --no-build-isolation -e ."
TIES_OVERFLOW = ("merge_ties: a task vector overflowed to infinity (finite inputs); the merge is undefined there")


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on tensors of ``device`` in this installation."""
    dev = torch.device(device)
    out = ["reference"]
    if dev.type == "cpu":
        if _C is not None:
            out.append("cpu")
        if triton_interpret() and triton_kernels() is not None:
            out.append("triton")
    elif dev.type == "cuda":
        if triton_kernels() is not None:
            out.append("triton")
    if cuda_extension() is not None and dev.type == cuda_device_type():
        out.append("cuda")
    return out


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The concrete backend for a call: the argument, else FASTMERGE_BACKEND, else the default."""
    name = backend if backend is not None else (os.environ.get("FASTMERGE_BACKEND") or "auto")
    name = name.strip().lower()
    if name == "auto":
        if device.type == "cpu":
            if _C is not None:
                return "cpu"
            _warn_once("noext", f"fastmerge: the compiled extension failed to import ({_C_ERROR}); "
                                f"running the slow PyTorch reference ops instead. {REBUILD_HINT}")
            return "reference"
        if device.type == "cuda":
            if triton_kernels() is not None:
                return "triton"
            if cuda_extension() is not None and cuda_device_type() == "cuda":
                return "cuda"
            why = (f"the Triton kernels could not be loaded ({_KERNELS_ERROR}) and the cuda backend is emulated on "
                   "CPU tensors (FASTMERGE_CUDA_EMULATE=1)" if cuda_device_type() == "cpu" else
                   f"neither the Triton kernels ({_KERNELS_ERROR}) nor the CUDA extension could be loaded")
            _warn_once("nogpu", f"fastmerge: {why}; running the PyTorch reference ops on CUDA tensors instead")
            return "reference"
        _warn_once("nodev", f"fastmerge: no kernels for {device.type} tensors; running the PyTorch reference ops")
        return "reference"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of auto, {', '.join(BACKENDS)}")
    if name == "cpu":
        if _C is None:
            raise RuntimeError(f"backend='cpu' needs the compiled extension, which failed to import ({_C_ERROR}); "
                               f"{REBUILD_HINT}")
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if name == "triton":
        if not (device.type == "cuda" or (device.type == "cpu" and triton_interpret())):
            raise ValueError(f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
                             f"before triton is imported), got tensors on {device}")
        if triton_kernels() is None:
            raise RuntimeError(f"backend='triton' is unavailable: importing the Triton kernels failed ({_KERNELS_ERROR})")
    if name == "cuda":
        from . import _cuda

        if device.type != cuda_device_type():
            if _cuda.EMULATED:
                raise ValueError(f"backend='cuda' runs in the CPU emulator (FASTMERGE_CUDA_EMULATE=1) and needs CPU "
                                 f"tensors there, got tensors on {device}")
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        if cuda_extension() is None:
            what = "the CUDA emulator extension" if _cuda.EMULATED else "the CUDA extension"
            raise RuntimeError(f"backend='cuda' is unavailable: {what} was not built or does not load "
                               f"({_cuda.ERROR or 'not built'}); {_cuda.BUILD_HINT}")
    return name


def _cuda_op(name: str, named, *args, overflow_msg: Optional[str] = None):
    """Run the CUDA op ``<name>`` (``torch.ops.fastmerge_cuda``, or ``fastmerge_cuda_emu`` when emulated)
    and raise the ValueError for a NaN/Inf it noted.

    The CUDA ops do not raise on non-finite data: they note it (per thread) and return. The note is
    cleared first, so a stale one from a direct call cannot leak into this call.
    """
    from . import _cuda

    _cuda.take_nonfinite()
    result = getattr(_cuda.ops(), name)(*args)
    if _cuda.take_nonfinite():
        V.raise_if_nonfinite(named)
        raise ValueError(overflow_msg or "a non-finite value appeared in the computation (finite inputs)")
    return result


_TIES_TEST_FLAGS = {"late": 4, "miss-low": 8, "miss-high": 16}


def _ties_strategy() -> int:
    """``FASTMERGE_TIES_STRATEGY`` (auto, one-pass, two-pass), plus the CPU kernel's test hooks from
    ``FASTMERGE_TIES_TEST`` (comma-separated: late, miss-low, miss-high; they change the path taken,
    never the result)."""
    s = os.environ.get("FASTMERGE_TIES_STRATEGY", "auto").strip().lower()
    code = {"auto": 0, "one-pass": 1, "two-pass": 2}.get(s, 0)
    for f in filter(None, (x.strip() for x in os.environ.get("FASTMERGE_TIES_TEST", "").split(","))):
        if f not in _TIES_TEST_FLAGS:
            raise ValueError(f"FASTMERGE_TIES_TEST: unknown flag {f!r} (use {', '.join(_TIES_TEST_FLAGS)})")
        code |= _TIES_TEST_FLAGS[f]
    return code


def _ties_scratch() -> tuple[int, int]:
    """CPU TIES scratch budgets per thread, from ``FASTMERGE_TIES_SCRATCH=CANDIDATES,BINS``
    (0 or unset: the built-in 2^23 candidates and 2^16 bins). Small budgets force the histogram narrowing passes."""
    raw = os.environ.get("FASTMERGE_TIES_SCRATCH", "").strip()
    if not raw:
        return 0, 0
    try:
        cand, bins = (int(x) for x in raw.split(","))
    except ValueError:
        raise ValueError(f"FASTMERGE_TIES_SCRATCH must be 'CANDIDATES,BINS' (two integers), got {raw!r}") from None
    if cand < 0 or bins < 0:
        raise ValueError(f"FASTMERGE_TIES_SCRATCH budgets must be >= 0, got {raw!r}")
    return cand, bins


# ---------------------------------------------------------------- uniform_average

@torch.library.custom_op("fastmerge::uniform_average", mutates_args=())
def uniform_average_op(thetas: list[Tensor], weights: list[float], backend: str) -> Tensor:
    if backend == "reference":
        return R.uniform_average(thetas, weights)
    if backend == "triton":
        return triton_kernels().uniform_average(list(thetas), list(weights))
    if backend == "cuda":
        return _cuda_op("uniform_average", V.named_inputs(None, None, "thetas", thetas), list(thetas), list(weights))
    return _C.uniform_average(list(thetas), list(weights))


@uniform_average_op.register_fake
def _(thetas, weights, backend):
    return thetas[0].new_empty(thetas[0].numel())


# ---------------------------------------------------------------- task_arithmetic

@torch.library.custom_op("fastmerge::task_arithmetic", mutates_args=())
def task_arithmetic_op(base: Tensor, thetas: list[Tensor], lam: list[float], backend: str) -> Tensor:
    if backend == "reference":
        return R.task_arithmetic(base, thetas, lam)
    if backend == "triton":
        return triton_kernels().task_arithmetic(base, list(thetas), list(lam))
    if backend == "cuda":
        return _cuda_op("task_arithmetic", V.named_inputs("base", base, "thetas", thetas), base, list(thetas), list(lam))
    return _C.task_arithmetic(base, list(thetas), list(lam))


@task_arithmetic_op.register_fake
def _(base, thetas, lam, backend):
    return base.new_empty(base.numel())


# ---------------------------------------------------------------- merge_ties

@torch.library.custom_op("fastmerge::merge_ties", mutates_args=())
def merge_ties_op(base: Tensor, thetas: list[Tensor], density: float, lam: float, merge: str, offsets: Tensor,
                  weights: Optional[list[float]], backend: str) -> Tensor:
    if backend == "reference":
        scope = "global" if offsets.numel() == 2 else "tensor"
        return R.merge_ties(base, thetas, density, lam, merge, scope, offsets, weights)
    V.check_merge(merge)
    w = None if weights is None else list(weights)
    if backend == "triton":
        return triton_kernels().merge_ties(base, list(thetas), float(density), float(lam), _MERGE_CODES[merge],
                                           offsets, w, _ties_strategy() & 3, overflow_msg=TIES_OVERFLOW)
    if backend == "cuda":
        return _cuda_op("merge_ties", V.named_inputs("base", base, "thetas", thetas), base, list(thetas), float(density),
                        float(lam), _MERGE_CODES[merge], offsets, w, _ties_strategy() & 3, overflow_msg=TIES_OVERFLOW)
    cand, bins = _ties_scratch()
    return _C.merge_ties(base, list(thetas), float(density), float(lam), _MERGE_CODES[merge], offsets,
                         w, _ties_strategy(), cand, bins)


@merge_ties_op.register_fake
def _(base, thetas, density, lam, merge, offsets, weights, backend):
    return base.new_empty(base.numel())


# ---------------------------------------------------------------- task_vector_cosine

@torch.library.custom_op("fastmerge::task_vector_cosine", mutates_args=())
def task_vector_cosine_op(base: Tensor, thetas: list[Tensor], gram: bool, backend: str) -> Tensor:
    if backend == "reference":
        return R.task_vector_cosine(base, thetas, gram=gram)
    if backend == "triton":
        G = triton_kernels().gram(base, list(thetas))
    elif backend == "cuda":
        G = _cuda_op("gram", V.named_inputs("base", base, "thetas", thetas), base, list(thetas))
    else:
        G = _C.gram(base, list(thetas))
    return G if gram else _cosine_of(G)


def _cosine_of(G: Tensor) -> Tensor:
    """cos_ij = G_ij / sqrt(G_ii G_jj), clamped to [-1, 1]; against a zero vector 0 (never NaN), and 1 on
    the diagonal of a nonzero one. (The kernels' own conversion; the twin has its own.)"""
    d = G.diagonal().clamp(min=0)
    denom = (d.unsqueeze(1) * d.unsqueeze(0)).sqrt()  # one rounding: opposite vectors give exactly -1
    live = denom > 0
    C = torch.where(live, G / torch.where(live, denom, torch.ones_like(denom)), torch.zeros_like(G)).clamp_(-1.0, 1.0)
    C.diagonal().copy_((d > 0).to(G.dtype))
    return C


@task_vector_cosine_op.register_fake
def _(base, thetas, gram, backend):
    T = len(thetas)
    return base.new_empty((T, T), dtype=torch.float64)


# ---------------------------------------------------------------- block_scale (+ backward)

@torch.library.custom_op("fastmerge::block_scale", mutates_args=())
def block_scale_op(base: Tensor, vectors: list[Tensor], coefs: Tensor, offsets: Tensor, backend: str) -> Tensor:
    if backend == "reference":
        with torch.no_grad():
            return R.block_scale(base, vectors, coefs, offsets)
    if backend == "triton":
        return triton_kernels().block_scale(base, list(vectors), coefs, offsets)
    if backend == "cuda":
        return _cuda_op("block_scale", [("coefs", coefs)] + V.named_inputs("base", base, "vectors", vectors), base,
                        list(vectors), coefs, offsets)
    return _C.block_scale(base, list(vectors), coefs, offsets)


@block_scale_op.register_fake
def _(base, vectors, coefs, offsets, backend):
    return base.new_empty(base.numel())


@torch.library.custom_op("fastmerge::block_scale_backward", mutates_args=())
def block_scale_backward_op(grad: Tensor, vectors: list[Tensor], coefs: Tensor, offsets: Tensor,
                            backend: str) -> Tensor:
    """∂L/∂coefs in float64, shape [T, B]."""
    if backend == "reference":
        return R.block_scale_backward(grad, vectors, coefs.double(), offsets)[1]
    if backend == "triton":
        return triton_kernels().block_scale_backward(grad, list(vectors), coefs, offsets)
    if backend == "cuda":
        return _cuda_op("block_scale_backward", V.named_inputs("grad", grad, "vectors", vectors), grad, list(vectors), coefs,
                        offsets)
    return _C.block_scale_backward(grad, list(vectors), coefs, offsets)


@block_scale_backward_op.register_fake
def _(grad, vectors, coefs, offsets, backend):
    return coefs.new_empty(coefs.shape, dtype=torch.float64)


def _bs_setup_context(ctx, inputs, output):
    base, vectors, coefs, offsets, backend = inputs
    ctx.backend = backend
    ctx.num_vectors = len(vectors)
    ctx.save_for_backward(coefs, offsets, *vectors)


def _bs_backward(ctx, grad):
    coefs, offsets, *vectors = ctx.saved_tensors
    needs = ctx.needs_input_grad
    g_base = grad if needs[0] else None
    g_coefs = None
    if needs[2]:
        g_coefs = block_scale_backward_op(grad.contiguous(), vectors, coefs, offsets, ctx.backend).to(coefs.dtype)
    g_vectors = [None] * ctx.num_vectors
    vec_needs = needs[1]
    if (any(vec_needs) if isinstance(vec_needs, (list, tuple)) else vec_needs):
        sizes = offsets[1:] - offsets[:-1]
        g_vectors = [
            (torch.repeat_interleave(coefs[t].to(grad.dtype), sizes.to(coefs.device), output_size=grad.numel()) * grad)
            for t in range(ctx.num_vectors)
        ]
    return g_base, g_vectors, g_coefs, None, None


block_scale_op.register_autograd(_bs_backward, setup_context=_bs_setup_context)


OPS = {
    "uniform_average": uniform_average_op,
    "task_arithmetic": task_arithmetic_op,
    "merge_ties": merge_ties_op,
    "task_vector_cosine": task_vector_cosine_op,
    "block_scale": block_scale_op,
    "block_scale_backward": block_scale_backward_op,
}
