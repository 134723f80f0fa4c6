"""fastmerge: fused kernels for task-vector model merging.

The ops work on flat parameter buffers (see :class:`fastmerge.FlatLayout`) and never materialise the
T x d task vectors. Every op has a pure-PyTorch twin in :mod:`fastmerge.reference`.

>>> import torch, fastmerge
>>> base = torch.zeros(6)
>>> thetas = torch.tensor([[1., -2., 0., 3., 0.5, -1.], [2., 1., 0., -3., 0.5, -2.]])
>>> fastmerge.merge_ties(base, thetas, density=0.5)
tensor([ 1.5000, -2.0000,  0.0000, -3.0000,  0.0000, -1.5000])
"""

from __future__ import annotations

import gc as _gc
from typing import Optional, Sequence, Union

# Importing torch creates about 10^5 objects, and the collector runs over them again and again while
# they are made (about 0.2 s of a command's start, freeing nothing): it is paused for these imports and
# then left as it was.
_collecting = _gc.isenabled()
_gc.disable()
try:
    import torch
    from torch import Tensor

    from . import _validate as V
    from . import reference
    from ._ops import _C, OPS, available_backends, resolve_backend
    from .flat import FlatLayout, flatten_module, layout_of
    from .merge import merge_checkpoints
finally:
    if _collecting:
        _gc.enable()

__version__ = "0.1.0"

__all__ = [
    "uniform_average",
    "task_arithmetic",
    "merge_ties",
    "task_vector_cosine",
    "block_scale",
    "FlatLayout",
    "flatten_module",
    "layout_of",
    "reference",
    "available_backends",
    "resolve_backend",
    "ties_stats",
    "cpu_capability",
    "cpu_prefetch_state",
    "empty_cache",
    "merge_checkpoints",
]

Thetas = Union[Tensor, Sequence[Tensor]]


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _offsets(blocks, numel: int, name: str) -> Tensor:
    if _compiling():  # data-dependent checks run inside the kernel instead
        if not isinstance(blocks, Tensor):
            raise TypeError(f"{name} must be an int64 tensor of offsets under torch.compile")
        return blocks
    return V.check_offsets(blocks, numel, name=name)


def uniform_average(thetas: Thetas, weights: Optional[Sequence[float]] = None, *,
                    backend: Optional[str] = None) -> Tensor:
    """Weighted average of T parameter vectors: Σ_t w_t θ_t / Σ_t w_t.

    Args:
        thetas: a list of T tensors of equal numel (any shape, any strides) or one [T, ...] tensor.
            Nothing is stacked or copied (except a non-contiguous multi-dimensional tensor, which
            has no 1-D view).
        weights: T non-negative floats with a positive sum; None means all ones.
        backend: ``"cpu"``, ``"reference"`` (or None: ``FASTMERGE_BACKEND``, else the default).

    Returns:
        A new tensor with the shape and dtype of ``thetas[0]``. Accumulation runs in float32
        (float64 for float64 inputs), in task order.

    Raises:
        ValueError: mismatched shapes/dtypes/devices, T = 0, bad weights, or a NaN/Inf in an input
            (the message names the task and the index).

    Example:
        >>> import torch, fastmerge
        >>> fastmerge.uniform_average([torch.ones(3), torch.zeros(3)], weights=[3, 1])
        tensor([0.7500, 0.7500, 0.7500])
    """
    ths = V.as_task_list(thetas)
    V.check_tasks(ths, "thetas")
    w = V.per_task_floats(1.0 if weights is None else weights, len(ths), "weights", nonneg=True)
    if not _compiling() and not sum(w) > 0:
        raise ValueError("weights sum to zero")
    shape = thetas.shape[1:] if isinstance(thetas, Tensor) else thetas[0].shape
    be = resolve_backend(backend, ths[0].device)
    return OPS["uniform_average"](ths, w, be).view(shape)


def task_arithmetic(base: Tensor, thetas: Thetas, lam: Union[float, Sequence[float]] = 1.0, *,
                    backend: Optional[str] = None) -> Tensor:
    """Task arithmetic: base + Σ_t λ_t (θ_t − base), without forming the task vectors.

    Args:
        base: the pretrained parameters (any shape).
        thetas: T fine-tuned parameter tensors (a list or one [T, ...] tensor), same numel and dtype.
        lam: one λ for all tasks or one per task.
        backend: see :func:`uniform_average`.

    Returns:
        A new tensor shaped like ``base``.

    Example:
        >>> import torch, fastmerge
        >>> fastmerge.task_arithmetic(torch.zeros(2), [torch.ones(2), 3 * torch.ones(2)], lam=0.5)
        tensor([2., 2.])
    """
    b = V._flat_view(base)
    ths = V.as_task_list(thetas)
    V.check_tasks(ths, "thetas", like=b)
    lams = V.per_task_floats(lam, len(ths), "lam")
    be = resolve_backend(backend, b.device)
    return OPS["task_arithmetic"](b, ths, lams, be).view(base.shape)


def merge_ties(base: Tensor, thetas: Thetas, density: float = 0.2, lam: float = 1.0, merge: str = "mean",
               scope: str = "global", layout=None, weights: Optional[Sequence[float]] = None, *,
               backend: Optional[str] = None) -> Tensor:
    """TIES-Merging (trim, elect sign, disjoint merge): base + λ·τ_merged, exact.

    For each task (and with ``scope="tensor"`` each parameter tensor of ``layout``) over its n
    entries, k = n − int(n·density) and the threshold is the k-th smallest |τ| (as torch.kthvalue);
    entries with |τ| ≥ threshold are kept, ties included (density = 1 keeps all). The elected sign
    is the sign of the task-order sum of kept entries, with exact zeros taking the majority sign
    (the sign of the sum of all elected signs). The merge averages (``"mean"``), sums (``"sum"``)
    or takes the largest magnitude (``"max"``) over the tasks whose kept entry has the elected sign.
    Masks and signs match :func:`fastmerge.reference.merge_ties` bit for bit.

    Args:
        base: pretrained parameters (any shape).
        thetas: T fine-tuned parameter tensors (a list or one [T, ...] tensor).
        density: fraction kept per task, in (0, 1].
        lam: scale of the merged task vector.
        merge: ``"mean"``, ``"sum"`` or ``"max"``.
        scope: ``"global"`` (one threshold per task over the whole vector) or ``"tensor"`` (one per
            task and parameter tensor; needs ``layout``).
        layout: a :class:`FlatLayout` or block offsets (int64, from 0 to numel), for ``scope="tensor"``.
        weights: optional positive per-task weights multiplying each task vector first.
        backend: see :func:`uniform_average`.

    Returns:
        A new tensor shaped like ``base``.

    Example:
        >>> import torch, fastmerge
        >>> base = torch.zeros(4)
        >>> fastmerge.merge_ties(base, [torch.tensor([3., -1., 0.5, 2.]), torch.tensor([-2., -1., 0.4, 1.])],
        ...                      density=0.5)
        tensor([ 3.0000, -1.0000,  0.0000,  1.5000])
    """
    b = V._flat_view(base)
    ths = V.as_task_list(thetas)
    V.check_tasks(ths, "thetas", like=b)
    density = V.check_density(density)
    V.check_merge(merge)
    V.check_scope(scope)
    lam_f = float(V.per_task_floats(lam, 1, "lam")[0])
    w = None if weights is None else V.per_task_floats(weights, len(ths), "weights", positive=True)
    if scope == "global":
        off = torch.tensor([0, b.numel()], dtype=torch.int64)
    else:
        if layout is None:
            raise ValueError('scope="tensor" needs layout= (a FlatLayout or block offsets)')
        off = _offsets(layout, b.numel(), "layout")
    be = resolve_backend(backend, b.device)
    return OPS["merge_ties"](b, ths, density, lam_f, merge, off, w, be).view(base.shape)


def task_vector_cosine(base: Tensor, thetas: Thetas, gram: bool = False, *,
                       backend: Optional[str] = None) -> Tensor:
    """T×T cosine similarities (or, with ``gram=True``, dot products) of τ_t = θ_t − base.

    Dot products accumulate in float64. A zero task vector has cosine 0 with everything (its
    diagonal entry too), never NaN.

    Args:
        base: pretrained parameters.
        thetas: T fine-tuned parameter tensors (a list or one [T, ...] tensor).
        gram: return the Gram matrix of dot products instead of cosines.
        backend: see :func:`uniform_average`.

    Returns:
        A float64 tensor of shape [T, T].

    Example:
        >>> import torch, fastmerge
        >>> fastmerge.task_vector_cosine(torch.zeros(2), [torch.tensor([1., 0.]), torch.tensor([1., 1.])])
        tensor([[1.0000, 0.7071],
                [0.7071, 1.0000]], dtype=torch.float64)
    """
    b = V._flat_view(base)
    ths = V.as_task_list(thetas)
    V.check_tasks(ths, "thetas", like=b)
    be = resolve_backend(backend, b.device)
    return OPS["task_vector_cosine"](b, ths, bool(gram), be)


def block_scale(base: Tensor, vectors: Thetas, coefs: Tensor, blocks=None, *,
                backend: Optional[str] = None) -> Tensor:
    """Block-scaled sum: base + Σ_t coefs[t, b(i)] · vectors[t][i], differentiable.

    With T task vectors this is the aTLAS forward; with T = 1, base = θ_m and vector = δ_m it is the
    DV-BASI forward. Gradients: ∂L/∂coefs[t, b] = Σ_{i∈b} g_i v_{t,i} (float64 accumulation, one
    fused pass), ∂L/∂base = g, and ∂L/∂vectors[t] = coefs[t, b(i)] g_i when asked for.

    Args:
        base: the parameters to add to (any shape).
        vectors: T tensors (a list or one [T, ...] tensor) with the numel and dtype of ``base``.
        coefs: [T, B] coefficients (any float dtype; the gradient comes back in that dtype).
        blocks: block boundaries: a :class:`FlatLayout` (one block per parameter tensor), or int64
            offsets from 0 to numel; None means one block.
        backend: see :func:`uniform_average`.

    Returns:
        A new tensor shaped like ``base``.

    Example:
        >>> import torch, fastmerge
        >>> coefs = torch.tensor([[1.0, 2.0]], requires_grad=True)
        >>> y = fastmerge.block_scale(torch.zeros(3), [torch.ones(3)], coefs, blocks=[0, 2, 3])
        >>> y
        tensor([1., 1., 2.], grad_fn=<...>)
        >>> y.sum().backward(); coefs.grad
        tensor([[2., 1.]])
    """
    b = V._flat_view(base)
    vs = V.as_task_list(vectors, "vectors")
    V.check_tasks(vs, "vectors", like=b)
    off = _offsets([0, b.numel()] if blocks is None else blocks, b.numel(), "blocks")
    if not _compiling():
        V.check_coefs(coefs, len(vs), off.numel() - 1, b)
    be = resolve_backend(backend, b.device)
    return OPS["block_scale"](b, vs, coefs, off, be).view(base.shape)


def ties_stats() -> dict:
    """Diagnostics of the last CPU merge_ties call on this thread.

    Returns:
        dict with the strategy, the full passes over the inputs (``passes``; of them
        ``narrow_passes`` were histogram passes that narrowed brackets too wide for the fixed
        candidate budget), bracket misses (a missed or overflowing bracket is narrowed to its exact
        threshold and the merge pass is run again), the candidates collected, the deferred and
        cancelled positions, and per-phase timings in seconds.
    """
    if _C is None:
        raise RuntimeError("the compiled extension is not available")
    return dict(_C.ties_last_stats())


def cpu_prefetch_state() -> dict:
    """Whether the streaming CPU ops (average, task arithmetic, block_scale forward) issue software
    prefetches. It depends on the processor: unless ``FASTMERGE_CPU_PREFETCH=on|off`` decides, the
    first large calls (64 MiB and more) time both ways and the faster is kept for the process.
    Results never depend on it.

    Returns:
        dict with ``mode`` (auto, on, off), ``chosen`` (on, off, or tuning), the timed runs of each
        way and their best times in ns per byte.
    """
    if _C is None:
        raise RuntimeError("the compiled extension is not available")
    return dict(_C.prefetch_state())


def cpu_capability() -> str:
    """Instruction set of the CPU kernels in use (DEFAULT, AVX2 or AVX512); set
    FASTMERGE_CPU_CAPABILITY to force one."""
    if _C is None:
        return "unavailable"
    return _C.cpu_capability()


def empty_cache() -> int:
    """Free the cached output blocks of the CPU kernels; returns the bytes freed."""
    return 0 if _C is None else int(_C.empty_cache())
