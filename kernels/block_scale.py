"""Triton kernels of ``block_scale`` (forward) and its coefficient gradient (backward).

Forward: out_i = b_i + Σ_t c[t, blk(i)]·v_{t,i}, accumulated as acc = b; acc = acc + c_t·v_t in
task order (float32, float64 for float64 input), as in ``fastmerge.reference.block_scale``.
Backward: gc[t, b] = Σ_{i∈b} g_i·v_{t,i} with g and v widened to float64.

Work items (``_common.block_items``) split every block into spans of at most ITEM_CHUNK entries, so
a program's span lies inside one block: it loads its T coefficients as scalars, and a row-sized
block (768 entries) and a per-tensor block (millions) are both one or a few programs each.

The backward reduces deterministically in two stages without atomics: each item writes its [T]
float64 partial sums (a fixed-shape [TP, BLOCK] accumulator over the span, then one fixed tree);
then one program per block adds the partials of its items in item order through a fixed-width
accumulator (a block without items gets 0). The backward's BLOCK, ITEM_CHUNK and num_warps are fixed
constants, never autotuned: they define the summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C

#: Entries per work item (its span lies inside one block). Part of the backward's summation order.
ITEM_CHUNK = 16384
#: Float64 accumulator elements per backward program ([TP, BLOCK]).
BWD_TILE_ELEMS = 4096
#: Items added per step by the backward's second stage.
BWD_R = 32
_BWD_WARPS = 4

# The first configuration is the one the interpreter runs (small tiles keep it quick).
_FWD_CONFIGS = C.STREAM_CONFIGS


@triton.jit
def _nonfinite_scan_kernel(x, n, flag, ACC64: tl.constexpr, BLOCK: tl.constexpr):
    """Flags a NaN/Inf anywhere in the small coefficient tensor (blocks without entries included)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    acc_ty: tl.constexpr = tl.float64 if ACC64 else tl.float32
    v = tl.load(x + offs, mask=offs < n, other=0.0).to(acc_ty)
    C.set_flag(flag, C.nonfinite(v, ACC64))


@C.autotune(_FWD_CONFIGS, key=["T", "len_class"], reset_to_zero=["flag"])
@triton.jit
def _block_scale_fwd_kernel(base, table, coefs, item_block, item_start, item_end, out, flag, B, num_items, ipp,
                            len_class, T: tl.constexpr, ACC64: tl.constexpr, ALIGNED: tl.constexpr,
                            BLOCK: tl.constexpr):
    acc_ty: tl.constexpr = tl.float64 if ACC64 else tl.float32
    first_item = tl.program_id(0).to(tl.int64) * ipp
    for j in range(tl.minimum(ipp, num_items - first_item)):  # the program's run of items
        item = first_item + j
        blk = tl.load(item_block + item)
        start = tl.load(item_start + item)
        end = tl.load(item_end + item)
        for k in range(tl.cdiv(end - start, BLOCK)):
            offs = start + k * BLOCK + tl.arange(0, BLOCK)
            lim = end + tl.zeros([BLOCK], dtype=tl.int64)
            if ALIGNED:  # block offsets multiples of 16, base pointers 16-byte aligned (host check)
                offs = tl.multiple_of(offs, 16)
                lim = tl.multiple_of(lim, 16)
            m = offs < lim
            b = tl.load(base + offs, mask=m, other=0.0).to(acc_ty)
            bad = C.nonfinite(b, ACC64)
            acc = b
            for t in tl.static_range(T):  # unrolled: independent loads, task-order additions
                c = tl.load(coefs + t * B + blk).to(acc_ty)
                ptrs = C.task_ptr(table, t, base) + offs
                if ALIGNED:
                    ptrs = tl.multiple_of(ptrs, 16)
                v = tl.load(ptrs, mask=m, other=0.0).to(acc_ty)
                bad = bad | C.nonfinite(v, ACC64)
                acc = acc + c * v
            tl.store(out + offs, C.to_out(acc, out), mask=m)
            C.set_flag(flag, bad)


@triton.jit
def _block_scale_bwd_items_kernel(grad, table, item_start, item_end, part, flag, num_items, ipp,
                                  T: tl.constexpr, TP: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.arange(0, TP)
    tvalid = rows < T
    vptr = tl.load(table + rows, mask=tvalid, other=0).to(tl.pointer_type(grad.dtype.element_ty))
    first_item = tl.program_id(0).to(tl.int64) * ipp
    for j in range(tl.minimum(ipp, num_items - first_item)):
        item = first_item + j
        start = tl.load(item_start + item)
        end = tl.load(item_end + item)
        # Each item's sum has a fixed order whatever the run of items a program gets: a
        # [TP, BLOCK] accumulator over the span, then one fixed tree.
        acc = tl.zeros([TP, BLOCK], dtype=tl.float64)
        for k in range(tl.cdiv(end - start, BLOCK)):
            offs = start + k * BLOCK + tl.arange(0, BLOCK)
            lim = end + tl.zeros([BLOCK], dtype=tl.int64)
            if ALIGNED:
                offs = tl.multiple_of(offs, 16)
                lim = tl.multiple_of(lim, 16)
            m = offs < lim
            g = tl.load(grad + offs, mask=m, other=0.0).to(tl.float64)
            vptrs = vptr[:, None] + offs[None, :]
            if ALIGNED:
                vptrs = tl.multiple_of(vptrs, [1, 16])
            v = tl.load(vptrs, mask=tvalid[:, None] & m[None, :], other=0.0).to(tl.float64)
            bad = C.nonfinite(g, True) | (tl.max(C.nonfinite(v, True).to(tl.int32), axis=0) > 0)
            C.set_flag(flag, bad)
            acc = acc + v * g[None, :]
        tl.store(part + item * T + rows, tl.sum(acc, axis=1), mask=tvalid)


@triton.jit
def _block_scale_bwd_blocks_kernel(part, first, gc, B, T: tl.constexpr, TP: tl.constexpr, R: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)
    i0 = tl.load(first + blk)
    i1 = tl.load(first + blk + 1)
    cols = tl.arange(0, TP)
    acc = tl.zeros([R, TP], dtype=tl.float64)
    for c0 in range(i0, i1, R):  # the block's items in item order, R at a time
        idx = c0 + tl.arange(0, R)
        acc = acc + tl.load(part + idx[:, None] * T + cols[None, :],
                            mask=(idx < i1)[:, None] & (cols < T)[None, :], other=0.0)
    tl.store(gc + cols * B + blk, tl.sum(acc, axis=0), mask=cols < T)


def _items_per_program(items, d: int) -> int:
    """Items per program: small blocks (rows of 768 entries, single entries) are grouped so that a
    program still streams about ITEM_CHUNK entries on average; one program per tiny item would be
    dominated by per-program overhead. Does not change any summation order."""
    mean_len = max(d // max(int(items["num_items"]), 1), 1)
    return max(1, min(64, ITEM_CHUNK // mean_len))


def _offsets_aligned(offsets: torch.Tensor) -> bool:
    return bool((offsets % 16 == 0).all())


def block_scale(base: torch.Tensor, vectors: list[torch.Tensor], coefs: torch.Tensor,
                offsets: torch.Tensor) -> torch.Tensor:
    """base + Σ_t coefs[t, blk(i)]·vectors[t][i] for validated inputs (offsets: int64 CPU [B+1])."""
    b = base if base.is_contiguous() else base.contiguous()
    vs = C.contiguous_tasks(vectors)
    T = len(vs)
    dev = b.device
    d = b.numel()
    B = offsets.numel() - 1
    c = coefs.detach().contiguous()
    out = torch.empty(d, dtype=b.dtype, device=dev)
    flag = C.new_flag(dev)
    # the coefficient scan has its own flag: autotuning the forward kernel resets ``flag``
    cflag = C.new_flag(dev)
    if c.numel():
        SCAN = 1024
        _nonfinite_scan_kernel[(triton.cdiv(c.numel(), SCAN),)](
            c, c.numel(), cflag, ACC64=c.dtype == torch.float64, BLOCK=SCAN, **C.LAUNCH)
    items = C.block_items(offsets, ITEM_CHUNK, dev)
    if items["num_items"]:
        table = C.pointer_table(vs, dev)
        aligned = C.all_aligned(vs) and _offsets_aligned(offsets)
        I, ipp = items["num_items"], _items_per_program(items, d)
        _block_scale_fwd_kernel[(triton.cdiv(I, ipp),)](
            b, table, c, items["block"], items["start"], items["end"], out, flag, B, I, ipp,
            int(items["max_len"]).bit_length(),
            T=T, ACC64=b.dtype == torch.float64, ALIGNED=aligned, **C.LAUNCH)
    # the CPU backend checks the coefficients first, then the data: same order here
    C.raise_if_flagged(flag | cflag, [("coefs", coefs)] + C.named_inputs("base", base, "vectors", vectors))
    return out


def block_scale_backward(grad: torch.Tensor, vectors: list[torch.Tensor], coefs: torch.Tensor,
                         offsets: torch.Tensor) -> torch.Tensor:
    """∂L/∂coefs [T, B] in float64: gc[t, b] = Σ_{i∈b} grad_i·vectors[t][i] (validated inputs)."""
    g = grad if grad.is_contiguous() else grad.contiguous()
    vs = C.contiguous_tasks(vectors)
    T = len(vs)
    dev = g.device
    d = g.numel()
    B = offsets.numel() - 1
    TP = C.next_pow2(T)
    gc = torch.empty(T, B, dtype=torch.float64, device=dev)
    if B == 0:
        return gc
    items = C.block_items(offsets, ITEM_CHUNK, dev)
    I = items["num_items"]
    flag = C.new_flag(dev)
    part = torch.empty(max(I, 1) * T, dtype=torch.float64, device=dev)
    if I:
        table = C.pointer_table(vs, dev)
        aligned = C.all_aligned(vs) and _offsets_aligned(offsets)
        ipp = _items_per_program(items, d)
        _block_scale_bwd_items_kernel[(triton.cdiv(I, ipp),)](
            g, table, items["start"], items["end"], part, flag, I, ipp,
            T=T, TP=TP, ALIGNED=aligned, BLOCK=max(BWD_TILE_ELEMS // TP, 16), num_warps=_BWD_WARPS, **C.LAUNCH)
    _block_scale_bwd_blocks_kernel[(B,)](part, items["first"], gc, B, T=T, TP=TP, R=BWD_R, num_warps=1, **C.LAUNCH)
    C.raise_if_flagged(flag, C.named_inputs("grad", grad, "vectors", vectors))
    return gc
