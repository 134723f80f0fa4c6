"""Triton kernel of ``task_arithmetic``: base + Σ_t λ_t (θ_t − base) in one pass.

Order of operations, as in ``fastmerge.reference.task_arithmetic``: acc = b, then
acc = acc + λ_t·(x_t − b) for t = 0, 1, … (task order, no fused multiply-add); the task vectors
are never materialised.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C

# The first configuration is the one the interpreter runs (small tiles keep it quick).
_CONFIGS = C.STREAM_CONFIGS


@C.autotune(_CONFIGS, key=["T", "size_class"], reset_to_zero=["flag"])
@triton.jit
def _task_arithmetic_kernel(base, table, lam, out, flag, d, size_class,
                            T: tl.constexpr, ACC64: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    acc_ty = lam.dtype.element_ty
    b = tl.load(base + offs, mask=mask, other=0.0).to(acc_ty)
    bad = C.nonfinite(b, ACC64)
    acc = b
    for t in tl.static_range(T):  # unrolled: independent loads, task-order additions
        ptrs = C.task_ptr(table, t, base) + offs
        if ALIGNED:
            ptrs = tl.multiple_of(ptrs, 16)
        x = tl.load(ptrs, mask=mask, other=0.0).to(acc_ty)
        bad = bad | C.nonfinite(x, ACC64)
        acc = acc + tl.load(lam + t) * (x - b)
    tl.store(out + offs, C.to_out(acc, out), mask=mask)
    C.set_flag(flag, bad)


def task_arithmetic(base: torch.Tensor, thetas: list[torch.Tensor], lam: list[float]) -> torch.Tensor:
    """base + Σ_t λ_t (θ_t − base) for a validated 1-D base and T tasks like it, on the GPU."""
    b = base if base.is_contiguous() else base.contiguous()
    xs = C.contiguous_tasks(thetas)
    T = len(xs)
    dev = b.device
    acc_t = C.acc_dtype(b.dtype)
    lams = C.small_tensor([float(v) for v in lam], acc_t, dev)
    d = b.numel()
    out = torch.empty(d, dtype=b.dtype, device=dev)
    if d == 0:
        return out
    flag = C.new_flag(dev)
    table = C.pointer_table(xs, dev)
    grid = lambda meta: (triton.cdiv(d, meta["BLOCK"]),)
    _task_arithmetic_kernel[grid](b, table, lams, out, flag, d, d.bit_length(),
                                  T=T, ACC64=acc_t == torch.float64, ALIGNED=C.all_aligned(xs),
                                  **C.LAUNCH)
    C.raise_if_flagged(flag, C.named_inputs("base", base, "thetas", thetas))
    return out
