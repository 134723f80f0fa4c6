"""Triton kernels of ``task_vector_cosine``: the T×T Gram matrix of τ_t = θ_t − base in float64.

τ_t is formed in the accumulation dtype (float32, float64 for float64 input) and widened to float64;
products and sums are float64, as in ``fastmerge.reference.task_vector_cosine``. For inputs of at
most float32 precision each product of two widened float32 values is exact in float64, so only the
summation order differs from the reference.

Two deterministic stages, no atomics:
1. ``_gram_partial_kernel``: grid (chunks, task groups, task groups). A chunk is NSUB steps of
   LANES consecutive entries, one entry per thread. Each step loads the two groups' τ rows as
   [GROUP, LANES] tiles (the same tile when T ≤ GROUP: one read of the inputs) and adds the outer
   products into a [GROUP, GROUP, LANES] float64 accumulator. The layout keeps every entry's
   GROUP×GROUP products inside one thread, so the whole chunk runs without any cross-thread
   traffic; one fixed tree over the LANES axis at the end gives the chunk's partial Gram block,
   stored to ``part[s, t, chunk]``.
2. ``_sum_chunks_kernel``: one program per (s, t) adds that entry's partials in chunk order through
   a fixed-width vector accumulator and one fixed tree at the end.
GROUP, LANES, NSUB, R and num_warps are fixed constants (never autotuned): they define the
summation order, so results are bit-identical across runs, processes and launches on one GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C

#: Tasks per register tile. T ≤ GROUP is one group (one read of the inputs); beyond that the Gram
#: matrix is computed in GROUP×GROUP blocks, each of which re-reads its two task groups.
GROUP = 8
_WARPS = 4
#: Entries per step: one per thread.
LANES = 32 * _WARPS
#: Steps per chunk: one partial Gram block per NSUB·LANES entries.
NSUB = 64
#: Width of the second stage's vector accumulator.
R = 1024


@triton.jit
def _gram_partial_kernel(base, table, part, flag, d, nchunks,
                         T: tl.constexpr, TG: tl.constexpr, ONE_GROUP: tl.constexpr, ACC64: tl.constexpr,
                         LANES: tl.constexpr, NSUB: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)
    gi = tl.program_id(1)  # group of the first index s of G[s, t]
    gj = tl.program_id(2)  # group of the second index t
    if gi <= gj:  # the lower group blocks are the mirror image, taken on the host
        acc_ty: tl.constexpr = tl.float64 if ACC64 else tl.float32
        lanes = tl.arange(0, TG)
        srow = gi * TG + lanes
        trow = gj * TG + lanes
        sv = srow < T
        tv = trow < T
        sptr = tl.load(table + srow, mask=sv, other=0).to(tl.pointer_type(base.dtype.element_ty))
        tptr = tl.load(table + trow, mask=tv, other=0).to(tl.pointer_type(base.dtype.element_ty))
        acc = tl.zeros([TG, TG, LANES], dtype=tl.float64)
        for k in range(NSUB):
            offs = (chunk * NSUB + k) * LANES + tl.arange(0, LANES)
            m = offs < d
            b = tl.load(base + offs, mask=m, other=0.0).to(acc_ty)
            xt = tl.load(tptr[:, None] + offs[None, :], mask=tv[:, None] & m[None, :], other=0.0).to(acc_ty)
            bad = C.nonfinite(b, ACC64) | (tl.max(C.nonfinite(xt, ACC64).to(tl.int32), axis=0) > 0)
            C.set_flag(flag, bad)
            tau_t = (xt - b[None, :]).to(tl.float64)  # rows ≥ T are 0 − 0 = 0
            if ONE_GROUP:
                tau_s = tau_t
            else:
                xs = tl.load(sptr[:, None] + offs[None, :], mask=sv[:, None] & m[None, :], other=0.0).to(acc_ty)
                tau_s = (xs - b[None, :]).to(tl.float64)
            acc = acc + tau_s[:, None, :] * tau_t[None, :, :]
        g = tl.sum(acc, axis=2)  # [s, t]
        dst = part + (srow[:, None].to(tl.int64) * T + trow[None, :]) * nchunks + chunk
        tl.store(dst, g, mask=sv[:, None] & tv[None, :])


@triton.jit
def _sum_chunks_kernel(part, out, nchunks, R: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([R], dtype=tl.float64)
    for c0 in range(0, nchunks, R):
        idx = c0 + tl.arange(0, R)
        acc = acc + tl.load(part + p * nchunks + idx, mask=idx < nchunks, other=0.0)
    tl.store(out + p, tl.sum(acc, axis=0))


def _launch(dtype: torch.dtype) -> dict:
    """Launch options of the partial-sum kernel. For inputs of at most float32 precision every
    float64 product of two widened float32 values is exact, so a fused multiply-add rounds exactly
    like the separate multiply and add (round(a·b + c) with a·b exact): fusion cannot change a bit,
    and it halves the float64 instruction count that bounds this kernel. The subtraction τ = x − b
    has no multiply to fuse with. Float64 input keeps fusion off (its products round)."""
    if dtype == torch.float64:
        return dict(C.LAUNCH)
    return {**C.LAUNCH, "enable_fp_fusion": True}


def gram(base: torch.Tensor, thetas: list[torch.Tensor]) -> torch.Tensor:
    """[T, T] float64 Gram matrix of the task vectors θ_t − base (validated inputs), on the GPU."""
    b = base if base.is_contiguous() else base.contiguous()
    xs = C.contiguous_tasks(thetas)
    T = len(xs)
    dev = b.device
    d = b.numel()
    TG = min(C.next_pow2(T), GROUP)
    ngroups = triton.cdiv(T, TG)
    nchunks = max(triton.cdiv(d, LANES * NSUB), 1)
    # Only the blocks with gi ≤ gj are written; the rest is never read back (mirrored below).
    part = torch.empty(T * T * nchunks, dtype=torch.float64, device=dev)
    flag = C.new_flag(dev)
    table = C.pointer_table(xs, dev)
    _gram_partial_kernel[(nchunks, ngroups, ngroups)](
        b, table, part, flag, d, nchunks,
        T=T, TG=TG, ONE_GROUP=ngroups == 1, ACC64=b.dtype == torch.float64,
        LANES=LANES, NSUB=NSUB, num_warps=_WARPS, **_launch(b.dtype))
    G = torch.empty(T, T, dtype=torch.float64, device=dev)
    _sum_chunks_kernel[(T * T,)](part, G, nchunks, R=R, num_warps=4, **C.LAUNCH)
    C.raise_if_flagged(flag, C.named_inputs("base", base, "thetas", thetas))
    # G[s, t] for s ≤ t is authoritative (its group block has gi ≤ gj): mirror it, so G is
    # exactly symmetric whatever the grouping.
    upper = torch.ones(T, T, dtype=torch.bool, device=dev).triu()
    return torch.where(upper, G, G.T)
