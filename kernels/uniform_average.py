"""Triton kernel of ``uniform_average``: Σ_t w_t θ_t / Σ_t w_t in one pass over the T inputs.

Order of operations, as in ``fastmerge.reference.uniform_average``: acc = θ_0·w_0, then
acc = acc + θ_t·w_t for t = 1, 2, … (task order, no fused multiply-add), out = acc / total, where
total is the task-order sum of the weights in the accumulation dtype (computed on the host).
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
def _uniform_average_kernel(table, w, out, flag, d, size_class,
                            T: tl.constexpr, ACC64: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    acc_ty = w.dtype.element_ty
    ptrs = C.task_ptr(table, 0, out) + offs
    if ALIGNED:  # every base pointer is 16-byte aligned (host check): allow vector loads
        ptrs = tl.multiple_of(ptrs, 16)
    x = tl.load(ptrs, mask=mask, other=0.0).to(acc_ty)
    bad = C.nonfinite(x, ACC64)
    acc = x * tl.load(w)
    # static_range unrolls the task loop, so the T loads of a program are independent and in
    # flight together, while the additions stay in task order.
    for t in tl.static_range(1, T):
        ptrs = C.task_ptr(table, t, out) + offs
        if ALIGNED:
            ptrs = tl.multiple_of(ptrs, 16)
        x = tl.load(ptrs, mask=mask, other=0.0).to(acc_ty)
        bad = bad | C.nonfinite(x, ACC64)
        acc = acc + x * tl.load(w + t)
    total = tl.load(w + T)
    # IEEE division, as on the CPU: Triton's float32 '/' is an approximate division on the GPU
    # (div_rn is float32-only; float64 '/' is already correctly rounded)
    if ACC64:
        q = acc / total
    else:
        q = tl.math.div_rn(acc, total)
    tl.store(out + offs, C.to_out(q, out), mask=mask)
    C.set_flag(flag, bad)


def uniform_average(thetas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Weighted average of T validated 1-D tensors (same numel, dtype, device) on the GPU."""
    xs = C.contiguous_tasks(thetas)
    T = len(xs)
    x0 = xs[0]
    dev = x0.device
    acc_t = C.acc_dtype(x0.dtype)
    # total = w_0 + w_1 + … in the accumulation dtype, rounded like the reference's scalars
    total = torch.tensor(float(weights[0]), dtype=acc_t)
    for t in range(1, T):
        total = total + torch.tensor(float(weights[t]), dtype=acc_t)
    if not float(total) > 0:
        raise ValueError("weights sum to zero")
    w = C.small_tensor([float(v) for v in weights] + [float(total)], acc_t, dev)
    d = x0.numel()
    out = torch.empty(d, dtype=x0.dtype, device=dev)
    if d == 0:
        return out
    flag = C.new_flag(dev)
    table = C.pointer_table(xs, dev)
    grid = lambda meta: (triton.cdiv(d, meta["BLOCK"]),)
    _uniform_average_kernel[grid](table, w, out, flag, d, d.bit_length(),
                                  T=T, ACC64=acc_t == torch.float64, ALIGNED=C.all_aligned(xs),
                                  **C.LAUNCH)
    C.raise_if_flagged(flag, C.named_inputs(None, None, "thetas", thetas))
    return out
