"""Helpers shared by the Triton kernels: task pointer tables, block work items, the in-pass
non-finite flag, and autotuning that degrades to a fixed configuration under the interpreter.

Conventions every Triton kernel of fastmerge follows:
- offsets and indices are int64 (``tl.program_id(0).to(tl.int64)`` before multiplying), so buffers
  of more than 2^31 elements work;
- a list of T task tensors is passed as a *pointer table*: an int64 tensor of the T data pointers
  on the device, cast back with ``.to(tl.pointer_type(base.dtype.element_ty))`` in the kernel; a
  [T, d] input arrives as T row views, so nothing is stacked or copied;
- every kernel is launched with ``enable_fp_fusion=False``: products and sums round separately, as
  in the PyTorch reference (no silent fused multiply-add); and with ``enable_reflect_ftz=False``, so
  library calls such as ``div_rn`` keep subnormal results as PyTorch does instead of flushing them;
- reductions are deterministic: fixed-size chunks produce partial sums that a second stage adds in
  a fixed order; there are no floating-point atomics (integer atomics only, whose results do not
  depend on the order);
- a NaN/Inf met inside a kernel's own pass sets an int32 flag; the host then finds the first
  offending input and index (a second scan runs only in that error case) and raises ValueError.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
import triton
import triton.language as tl

from fastmerge import _ops
from fastmerge import _validate as V

#: True when the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before import).
INTERPRET = _ops.triton_interpret()

named_inputs = V.named_inputs

#: Launch options every kernel call passes (see the module docstring).
LAUNCH = {"enable_fp_fusion": False, "enable_reflect_ftz": False}


def contiguous_tasks(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """1-D contiguous versions of the inputs (a copy only for a non-contiguous 1-D view)."""
    return [x if x.is_contiguous() else x.contiguous() for x in tensors]


def pointer_table(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """int64 tensor of the data pointers of ``tensors`` on ``device`` (the caller keeps them alive)."""
    ptrs = [x.data_ptr() for x in tensors]
    if device.type == "cpu":
        return torch.tensor(ptrs, dtype=torch.int64)
    return torch.tensor(ptrs, dtype=torch.int64).pin_memory().to(device, non_blocking=True)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def new_flag(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)


def raise_if_flagged(flag: torch.Tensor, named: Sequence[tuple[str, torch.Tensor]],
                     overflow_msg: str | None = None) -> None:
    """After a kernel ran: if it flagged a NaN/Inf, raise the ValueError naming input and index.

    ``overflow_msg``: for kernels that also flag intermediate values (TIES flags a weighted task
    vector that overflowed from finite inputs), the message when no input is non-finite.
    """
    if int(flag.item()) == 0:
        return
    hit = V.find_nonfinite(named)
    if hit is None:
        if overflow_msg is not None:
            raise ValueError(overflow_msg)
        raise RuntimeError("fastmerge: a Triton kernel flagged a non-finite input that a rescan did not find")
    raise ValueError(V.nonfinite_message(*hit))


# ---------------------------------------------------------------- block work items

_ITEMS_CACHE: dict = {}
_ITEMS_CACHE_MAX = 16


def block_items(offsets: torch.Tensor, chunk: int, device: torch.device):
    """Split blocks into work items of at most ``chunk`` entries, each inside one block.

    ``offsets`` is the validated int64 CPU tensor [B + 1]. Returns a dict of device tensors:
    ``block`` [I] (int64, the block of each item), ``start`` / ``end`` [I] (int64 entry range),
    ``first`` [B + 1] (int64, items of block b are first[b] .. first[b+1]-1; empty blocks own
    none), and the Python ints ``num_items`` and ``max_len``. Cached by the offsets' content.
    """
    off = offsets.detach().to("cpu", torch.int64).contiguous()
    key = (hashlib.blake2b(off.numpy().tobytes(), digest_size=16).hexdigest(), int(chunk), str(device))
    hit = _ITEMS_CACHE.get(key)
    if hit is not None:
        return hit
    sizes = off[1:] - off[:-1]
    nitems = (sizes + chunk - 1) // chunk  # empty blocks: 0 items
    first = torch.zeros(off.numel(), dtype=torch.int64)
    torch.cumsum(nitems, 0, out=first[1:])
    total = int(first[-1])
    block = torch.repeat_interleave(torch.arange(sizes.numel(), dtype=torch.int64), nitems, output_size=total)
    local = torch.arange(total, dtype=torch.int64) - first[:-1][block]
    start = off[:-1][block] + local * chunk
    end = torch.minimum(start + chunk, off[1:][block])
    res = {
        "block": block.to(device),
        "start": start.to(device),
        "end": end.to(device),
        "first": first.to(device),
        "num_items": total,
        "max_len": int(min(chunk, int(sizes.max()) if sizes.numel() else 0)),
    }
    if len(_ITEMS_CACHE) >= _ITEMS_CACHE_MAX:
        _ITEMS_CACHE.pop(next(iter(_ITEMS_CACHE)))
    _ITEMS_CACHE[key] = res
    return res


# ---------------------------------------------------------------- autotuning

class _Fixed:
    """Stand-in for triton.autotune under the interpreter (which cannot benchmark): launches with
    the first configuration's meta-parameters."""

    def __init__(self, fn, config):
        self.fn = fn
        self.kwargs = dict(config.kwargs)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            meta = dict(self.kwargs)
            meta.update(kwargs)
            g = grid(meta) if callable(grid) else grid
            return self.fn[g](*args, **meta)

        return launch


def autotune(configs, key, **kw):
    """``triton.autotune`` on a GPU; the first config, fixed, under the interpreter.

    Pass ``reset_to_zero=[...]`` for every output a kernel accumulates into (integer counters,
    flags), so that benchmarking runs do not leave their counts behind.
    """

    def deco(fn):
        if INTERPRET:
            return _Fixed(fn, configs[0])
        return triton.autotune(configs=configs, key=key, **kw)(fn)

    return deco


# ---------------------------------------------------------------- small shared pieces of the kernels

#: Autotuning space of the elementwise streaming kernels (the first is the interpreter's).
STREAM_CONFIGS = [
    triton.Config({"BLOCK": 256}, num_warps=4),
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=8),
    triton.Config({"BLOCK": 4096}, num_warps=8),
]

#: Byte alignment the kernels may promise the compiler (vector loads) when every base pointer has it.
ALIGN_BYTES = 16


def all_aligned(tensors: Sequence[torch.Tensor]) -> bool:
    """True when every tensor's data starts on an ALIGN_BYTES boundary (row views of a [T, d]
    tensor with d * itemsize not a multiple of 16 do not, and must not get the hint)."""
    return all(x.data_ptr() % ALIGN_BYTES == 0 for x in tensors)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the reference: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def small_tensor(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A few per-task scalars as a device tensor (rounded on the host exactly as the reference
    rounds them: ``torch.tensor(v, dtype=...)``)."""
    t = torch.tensor(list(values), dtype=dtype)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


@triton.jit
def nonfinite(x, ACC64: tl.constexpr):
    """Elementwise NaN/Inf test by the exponent bits (x in float32, or float64 when ACC64): a bit
    test cannot be folded away by value-based reasoning about NaN."""
    if ACC64:
        bits = x.to(tl.int64, bitcast=True)
        return (bits & 0x7FF0000000000000) == 0x7FF0000000000000
    else:
        bits = x.to(tl.int32, bitcast=True)
        return (bits & 0x7F800000) == 0x7F800000


@triton.jit
def task_ptr(table, t, elem_like):
    """Pointer to task ``t``'s data from a pointer table, typed like ``elem_like``.

    Alignment: Triton ignores hints on scalars such as a table entry, so a kernel that knows (a
    host check, passed as a constexpr) that every base pointer is 16-byte aligned states it on the
    pointer *block* it loads from, ``tl.multiple_of(p + offs, 16)``, inline in the kernel body (a
    hint on a helper's argument would be lost).
    """
    return tl.load(table + t).to(tl.pointer_type(elem_like.dtype.element_ty))


@triton.jit
def set_flag(flag, bad):
    """Raise the int32 flag when any lane of ``bad`` (int1 tensor) is set. Every writer stores the
    same value 1, so the plain store needs no atomic."""
    anybad = tl.max(bad.to(tl.int32), axis=0) > 0
    tl.store(flag, 1, mask=anybad)


@triton.jit
def to_out(acc, out):
    """``acc`` (float32/float64) converted to ``out``'s element type, rounding to nearest even.

    bfloat16 is rounded by hand: the Triton interpreter truncates float32 → bfloat16, which would
    make interpreter runs disagree with PyTorch (and the GPU) in the last bit. The integer
    rounding below is the IEEE round-to-nearest-even of the top 16 bits (NaN inputs raise anyway).
    """
    if out.dtype.element_ty == tl.bfloat16:
        bits = acc.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return acc.to(out.dtype.element_ty)
