"""torch.library schemas of the fastmerge ops, their fake kernels, autograd, and backend dispatch.

Each op takes flat 1-D tensors (the public functions in ``fastmerge/__init__.py`` flatten and
reshape) and a concrete ``backend`` string, resolved before the op is called:

- ``reference``: the pure-PyTorch twins in ``fastmerge.reference``;
- ``cpu``: the fused C++ kernels of ``fastmerge._C``;
- ``triton`` / ``cuda``: GPU kernels (not part of this build yet: asking for them raises).

Default: CPU tensors use ``cpu``. When the extension is missing, or for GPU tensors (no GPU kernels
in this build), the ``reference`` backend runs instead, with one warning that says so.
``FASTMERGE_BACKEND`` overrides the default, and so does each function's ``backend=`` argument.
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
_MERGE_CODES = {"mean": 0, "sum": 1, "max": 2}
_warned: set[str] = set()

REBUILD_HINT = "rebuild it with: pip install --no-build-isolation -e ."


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on tensors of ``device`` in this installation."""
    dev = torch.device(device)
    out = ["reference"]
    if dev.type == "cpu" and _C is not None:
        out.append("cpu")
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
        _warn_once("nogpu", f"fastmerge: no GPU kernels in this build for {device.type} tensors; "
                            "running the PyTorch reference ops instead")
        return "reference"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of auto, {', '.join(BACKENDS)}")
    if name == "cpu":
        if _C is None:
            raise RuntimeError(f"backend='cpu' needs the compiled extension, which failed to import ({_C_ERROR}); "
                               f"{REBUILD_HINT}")
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    if name in ("triton", "cuda"):
        raise RuntimeError(f"backend={name!r} is not available in this build (no GPU kernels yet); "
                           "use backend='reference' for GPU tensors")
    return name


def _ties_strategy() -> int:
    s = os.environ.get("FASTMERGE_TIES_STRATEGY", "auto").strip().lower()
    return {"auto": 0, "one-pass": 1, "two-pass": 2}.get(s, 0)


# ---------------------------------------------------------------- uniform_average

@torch.library.custom_op("fastmerge::uniform_average", mutates_args=())
def uniform_average_op(thetas: list[Tensor], weights: list[float], backend: str) -> Tensor:
    if backend == "reference":
        return R.uniform_average(thetas, weights)
    return _C.uniform_average(list(thetas), list(weights))


@uniform_average_op.register_fake
def _(thetas, weights, backend):
    return thetas[0].new_empty(thetas[0].numel())


# ---------------------------------------------------------------- task_arithmetic

@torch.library.custom_op("fastmerge::task_arithmetic", mutates_args=())
def task_arithmetic_op(base: Tensor, thetas: list[Tensor], lam: list[float], backend: str) -> Tensor:
    if backend == "reference":
        return R.task_arithmetic(base, thetas, lam)
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
    return _C.merge_ties(base, list(thetas), float(density), float(lam), _MERGE_CODES[merge], offsets,
                         None if weights is None else list(weights), _ties_strategy())


@merge_ties_op.register_fake
def _(base, thetas, density, lam, merge, offsets, weights, backend):
    return base.new_empty(base.numel())


# ---------------------------------------------------------------- task_vector_cosine

@torch.library.custom_op("fastmerge::task_vector_cosine", mutates_args=())
def task_vector_cosine_op(base: Tensor, thetas: list[Tensor], gram: bool, backend: str) -> Tensor:
    if backend == "reference":
        return R.task_vector_cosine(base, thetas, gram=gram)
    G = _C.gram(base, list(thetas))
    return G if gram else R.gram_to_cosine(G)


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
