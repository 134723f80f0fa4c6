"""Argument checks shared by every backend.

Each function raises ``ValueError`` (or ``TypeError``) with a message that names the argument and,
where it applies, the task and the index. The checks here are cheap (metadata and Python scalars);
scanning the data for NaN/Inf is done by each backend inside its own pass.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MERGE_MODES = ("mean", "sum", "max")
SCOPES = ("global", "tensor")


def _flat_view(x: torch.Tensor) -> torch.Tensor:
    """A 1-D view of ``x`` when one exists (any strided 1-D view), else a contiguous copy."""
    if x.dim() == 1:
        return x
    if x.dim() == 0:
        return x.reshape(1)
    try:
        return x.view(-1)
    except RuntimeError:
        # A non-contiguous multi-dimensional tensor has no single-stride 1-D view: copy it.
        return x.reshape(-1)


def as_task_list(thetas, name: str = "thetas") -> list[torch.Tensor]:
    """Turn ``thetas`` (a list of tensors or one [T, ...] tensor) into a list of 1-D tensors.

    A [T, d] tensor is unbound into row views: nothing is copied to stack or unstack it.
    """
    if isinstance(thetas, torch.Tensor):
        if thetas.dim() < 2:
            raise ValueError(
                f"{name}: a single tensor must be [T, d] (one row per task); got shape "
                f"{tuple(thetas.shape)}"
            )
        rows = list(thetas.unbind(0))
    elif isinstance(thetas, (list, tuple)):
        rows = list(thetas)
    else:
        raise TypeError(f"{name} must be a list of tensors or one [T, d] tensor, got {type(thetas).__name__}")
    if len(rows) == 0:
        raise ValueError(f"{name} is empty: at least one task (T >= 1) is needed")
    out = []
    for t, x in enumerate(rows):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}[{t}] must be a tensor, got {type(x).__name__}")
        out.append(_flat_view(x))
    return out


def check_float(x: torch.Tensor, name: str) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; expected one of float32, bfloat16, float16, float64")


def check_tasks(tensors: Sequence[torch.Tensor], name: str, like: torch.Tensor | None = None,
                like_name: str = "base") -> None:
    """All tasks share numel, dtype and device (with each other and with ``like`` if given)."""
    ref = like if like is not None else tensors[0]
    ref_name = like_name if like is not None else f"{name}[0]"
    check_float(ref, ref_name)
    for t, x in enumerate(tensors):
        if x.numel() != ref.numel():
            raise ValueError(
                f"mismatched shapes: {name}[{t}] has {x.numel()} elements but {ref_name} has {ref.numel()}"
            )
        if x.dtype != ref.dtype:
            raise ValueError(f"mismatched dtypes: {name}[{t}] is {x.dtype} but {ref_name} is {ref.dtype}")
        if x.device != ref.device:
            raise ValueError(f"mismatched devices: {name}[{t}] is on {x.device} but {ref_name} is on {ref.device}")


def per_task_floats(value, T: int, name: str, *, positive: bool = False, nonneg: bool = False) -> list[float]:
    """A scalar or a length-T sequence (or 1-D tensor) of finite floats, as a list of T floats."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = float(value)
        else:
            value = [float(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        vals = [float(value)] * T
    elif isinstance(value, (list, tuple)):
        if len(value) != T:
            raise ValueError(f"{name} has {len(value)} entries but there are {T} tasks")
        vals = [float(v) for v in value]
    else:
        raise TypeError(f"{name} must be a float or a sequence of {T} floats, got {type(value).__name__}")
    for t, v in enumerate(vals):
        if not math.isfinite(v):
            raise ValueError(f"{name}[{t}] is not finite ({v})")
        if positive and not v > 0:
            raise ValueError(f"{name}[{t}] must be > 0, got {v}")
        if nonneg and v < 0:
            raise ValueError(f"{name}[{t}] must be >= 0, got {v}")
    return vals


def check_density(density) -> float:
    try:
        d = float(density)
    except (TypeError, ValueError):
        raise TypeError(f"density must be a float in (0, 1], got {density!r}") from None
    if not (0.0 < d <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    return d


def check_merge(merge: str) -> str:
    if merge not in MERGE_MODES:
        raise ValueError(f"unknown merge mode {merge!r}; expected one of {', '.join(MERGE_MODES)}")
    return merge


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {', '.join(SCOPES)}")
    return scope


def check_offsets(offsets, numel: int, name: str = "blocks") -> torch.Tensor:
    """Validate block boundaries: a 1-D int64 sequence from 0 to numel, non-decreasing.

    Accepts an int64 tensor, a sequence of Python ints, or a FlatLayout (one block per parameter
    tensor). Returns a contiguous int64 CPU tensor. The C++ kernels repeat these checks with the
    same messages (they run alone under torch.compile).
    """
    if hasattr(offsets, "block_offsets") and not isinstance(offsets, torch.Tensor):
        offsets = offsets.block_offsets("tensor")
    if isinstance(offsets, torch.Tensor):
        if offsets.dim() != 1:
            raise ValueError(f"{name} must be a 1-D sequence of offsets, got shape {tuple(offsets.shape)}")
        if offsets.dtype != torch.int64:
            raise ValueError(f"{name} must hold int64 offsets, got dtype {offsets.dtype}")
        off = offsets.detach().to("cpu").contiguous()
    else:
        try:
            vals = list(offsets)
        except TypeError:
            raise TypeError(f"{name} must be a sequence of offsets or a FlatLayout, got {type(offsets).__name__}") from None
        for v in vals:
            if isinstance(v, (list, tuple)) or (isinstance(v, torch.Tensor) and v.dim() > 0):
                raise ValueError(f"{name} must be a 1-D sequence of offsets, got a nested entry {v!r}")
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must hold int64 offsets (Python ints), got {v!r}")
        off = torch.tensor(vals, dtype=torch.int64)
    if off.numel() < 2:
        raise ValueError(f"{name} must have at least two offsets (start 0 and end {numel}), got {off.numel()}")
    if int(off[0]) != 0:
        raise ValueError(f"{name} do not tile the buffer: the first offset is {int(off[0])}, expected 0")
    if int(off[-1]) != numel:
        raise ValueError(f"{name} do not tile the buffer: the last offset is {int(off[-1])}, expected {numel}")
    diffs = off[1:] - off[:-1]
    if bool((diffs < 0).any()):
        b = int((diffs < 0).nonzero()[0])
        raise ValueError(
            f"{name} do not tile the buffer: offsets decrease at block {b} ({int(off[b])} -> {int(off[b + 1])})"
        )
    return off


def check_coefs(coefs: torch.Tensor, T: int, B: int, like: torch.Tensor) -> None:
    if not isinstance(coefs, torch.Tensor):
        raise TypeError(f"coefs must be a tensor of shape [{T}, {B}], got {type(coefs).__name__}")
    check_float(coefs, "coefs")
    if tuple(coefs.shape) != (T, B):
        raise ValueError(f"coefs has shape {tuple(coefs.shape)}; expected [T, B] = [{T}, {B}]")
    if coefs.device != like.device:
        raise ValueError(f"mismatched devices: coefs is on {coefs.device} but base is on {like.device}")


def nonfinite_message(name: str, index: int, value: float) -> str:
    return f"{name} contains a non-finite value ({value}) at index {index}"


def named_inputs(first_name, first, list_name: str, tensors) -> list[tuple[str, torch.Tensor]]:
    """``[(first_name, first), (f"{list_name}[0]", tensors[0]), ...]`` (``first`` may be None): the
    inputs of an op in the order their NaN/Inf is reported."""
    out = [] if first is None else [(first_name, first)]
    return out + [(f"{list_name}[{t}]", x) for t, x in enumerate(tensors)]


def find_nonfinite(named: Sequence[tuple[str, torch.Tensor]]):
    """First (name, index, value) of a NaN/Inf in the given tensors, in order; None if all finite."""
    for name, x in named:
        bad = ~torch.isfinite(x.reshape(-1))
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            return name, i, float(x.reshape(-1)[i])
    return None


def raise_if_nonfinite(named: Sequence[tuple[str, torch.Tensor]]) -> None:
    hit = find_nonfinite(named)
    if hit is not None:
        raise ValueError(nonfinite_message(*hit))


def ties_k(n: int, density: float) -> int:
    """The trim rank, computed as the TIES-Merging authors' code does: k = n - int(n * density)."""
    return n - int(n * density)
