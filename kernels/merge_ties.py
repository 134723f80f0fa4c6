"""Exact TIES-Merging in Triton: sampled threshold brackets, one fused streaming pass, a small fix-up.

For each problem p = (task t, segment s) (one segment for ``scope="global"``, one per parameter
tensor for ``scope="tensor"``) the trim threshold is the k-th smallest |τ| over the segment's n
entries, k = n − int(n·density). Sorting or a radix select over the whole data costs several
passes; this module needs about one:

1. **Sample.** A deterministic, stratified sample of m ≤ 131072 entries per problem is gathered and
   sorted. Its order statistics give a guess c of the threshold and a bracket [lo, hi] that holds
   the exact threshold with overwhelming probability (±4 binomial standard deviations of the rank).
   A segment no larger than the sample is sampled whole, which makes c = lo = hi the exact threshold.
2. **Pass.** One streaming pass reads base and the T inputs once and writes the merged output with
   the guessed thresholds c. Per problem it counts the entries below lo, equal to lo and equal to
   hi, and appends the entries strictly inside (lo, hi) with their positions to a candidate buffer.
   It also adds sign(s_i) of every position into an integer tally (for the majority sign) and lists
   the positions whose task-order sum cancelled exactly (s_i = 0 with a nonzero kept entry).
3. **Select.** The exact threshold is the (k − below)-th smallest of {= lo} ∪ candidates ∪ {= hi};
   when it falls among the candidates, a radix select (8-bit digits, integer histograms) over the
   candidate buffer finds it.
4. **Fix-up.** Only positions with an entry between c and the exact threshold were merged with a
   wrong trim decision; they are all in the candidate buffer. Each is recomputed once (the lowest
   task with a flipped entry owns the position), correcting the sign tally.
5. **Majority.** The listed cancelled positions are rewritten with the majority sign.

If the bracket misses (or the candidate buffer overflows, or a tie at lo sits on the wrong side of
the guess) the call falls back to an exact radix select over the whole data followed by a second
pass with the exact thresholds — slower, equally exact. ``strategy=2`` forces that path.

Scratch: the sample (T·S·m values), the candidate buffer (sized from the bracket, ~1 % of the
inputs), the cancelled-positions list (bounded; an overflow triggers one more pass) and
O(T·S·256) histogram counters. Bit for bit equal to ``fastmerge.reference.merge_ties``.
"""

from __future__ import annotations

import os
import time

import torch
import triton
import triton.language as tl

from fastmerge import _validate as V

from . import _common as C

CHUNK = 16384          # entries per work item (an item lies inside one segment)
SAMPLE_MAX = 131072    # sampled entries per problem (global scope)
SAMPLE_MAX_TENSOR = 8192  # per problem with scope="tensor" (many problems)
SAMPLE_BUDGET = 1 << 24   # most sampled values in all (T x segments x per-problem sample)
Z = 4.0                # bracket half-width in standard deviations of the sampled rank
NB = 256               # radix digit: 8 bits
CANCEL_CAP_MIN = 1 << 16
GRID_Y_MAX = 65535     # CUDA's limit on the second grid dimension (chunks loop beyond it)

_last_stats: dict = {}
PROFILE = os.environ.get("FASTMERGE_TIES_PROFILE", "0") == "1"  # per-phase times in last_stats (syncs)


def last_stats() -> dict:
    """Diagnostics of the last Triton merge_ties call (path taken, candidates, fix-ups)."""
    return dict(_last_stats)


# ---------------------------------------------------------------- kernels

@triton.jit
def _tau(x, b, w_ptr, t, HAS_W: tl.constexpr, ACC: tl.constexpr):
    tau = x.to(ACC) - b
    if HAS_W:
        tau = tau * tl.load(w_ptr + t)
    return tau


@triton.jit
def _majority_zero(b, MODE: tl.constexpr, ACC: tl.constexpr):
    """Max merge with nothing kept and base == -0: the reference adds lam * (0 * majority), and
    the sign of that zero decides the sign of the result, so the majority sign is needed too."""
    if MODE == 2:
        if ACC == tl.float64:
            return b.to(tl.int64, bitcast=True) == -9223372036854775808
        else:
            return b.to(tl.int32, bitcast=True) == -2147483648
    else:
        return b != b  # all false (b is finite here)


@triton.jit
def _sign_i(v):
    return (v > 0).to(tl.int64) - (v < 0).to(tl.int64)


@triton.jit
def _ld(ptrs, m, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptrs, mask=m, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _pass_step(i0, end, seg, tab, b_ptr, out_ptr, w_ptr, lam_a, majority, c_ptr, lo_ptr, hi_ptr, cnt_ptr, cand_val,
               cand_pos, cbase_ptr, ccap_ptr, ccnt_ptr, cpos_ptr, cseg_ptr, CCAP, rows, bad, below_p, eqlo_p, eqhi_p,
               below_acc, eqlo_acc, eqhi_acc, tally, S, T: tl.constexpr, MODE: tl.constexpr, HAS_W: tl.constexpr,
               COLLECT: tl.constexpr, MAJ_ALL: tl.constexpr, ACC: tl.constexpr, PACKED: tl.constexpr,
               ALIGNED: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """One step of BLOCK entries of ``_ties_pass`` (MASKED only for the last, partial step)."""
    offs = i0 + tl.arange(0, BLOCK).to(tl.int64)
    # full blocks run unmasked (vector loads when ALIGNED); only an item's tail is masked
    m = offs < end
    bptrs = b_ptr + offs
    if ALIGNED:
        bptrs = tl.multiple_of(bptrs, 16)
    b = _ld(bptrs, m, MASKED).to(ACC)
    s = tl.zeros([BLOCK], dtype=ACC)
    nz = tl.zeros([BLOCK], dtype=tl.int1)
    # One sweep over the tasks: the task-order sum s, and the task-order sums (counts, maxima)
    # of the positive and of the negative kept entries; the elected sign then picks one of
    # them, which is exactly the reference's sum over the entries whose sign equals it.
    acc_p = tl.zeros([BLOCK], dtype=ACC)
    acc_n = tl.zeros([BLOCK], dtype=ACC)
    cnt_p = tl.zeros([BLOCK], dtype=ACC)
    cnt_n = tl.zeros([BLOCK], dtype=ACC)
    for t in tl.static_range(T):
        xptrs = C.task_ptr(tab, t, b_ptr) + offs
        if ALIGNED:
            xptrs = tl.multiple_of(xptrs, 16)
        x = _ld(xptrs, m, MASKED)
        tau = _tau(x, b, w_ptr, t, HAS_W, ACC)
        # a NaN/Inf in x or b makes tau non-finite, and so does a weighted difference of finite
        # inputs that overflowed: one test per task covers all three
        bad = bad | (m & C.nonfinite(tau, ACC == tl.float64))
        a = tl.abs(tau)
        p = t * S + seg
        c = tl.load(c_ptr + p)
        tr = tl.where(a >= c, tau, 0.0)
        s = s + tr
        nz = nz | (tr != 0.0)
        if MODE == 2:
            acc_p = tl.maximum(acc_p, tl.where(tr > 0.0, a, 0.0))
            acc_n = tl.maximum(acc_n, tl.where(tr < 0.0, a, 0.0))
        else:
            acc_p = acc_p + tl.where(tr > 0.0, tr, 0.0)
            acc_n = acc_n + tl.where(tr < 0.0, tr, 0.0)
            cnt_p = cnt_p + tl.where(tr > 0.0, 1.0, 0.0)
            cnt_n = cnt_n + tl.where(tr < 0.0, 1.0, 0.0)
        if COLLECT:
            lo = tl.load(lo_ptr + p)
            hi = tl.load(hi_ptr + p)
            if PACKED:
                below_p += (m & (a < lo)).to(tl.int64) << (5 * t)
                eqlo_p += (m & (a == lo)).to(tl.int64) << (5 * t)
                eqhi_p += (m & (a == hi) & (a > lo)).to(tl.int64) << (5 * t)
            else:
                below_acc += tl.where(rows == t, tl.sum((m & (a < lo)).to(tl.int64), axis=0), 0)
                eqlo_acc += tl.where(rows == t, tl.sum((m & (a == lo)).to(tl.int64), axis=0), 0)
                eqhi_acc += tl.where(rows == t, tl.sum((m & (a == hi) & (a > lo)).to(tl.int64), axis=0), 0)
            cand = m & (a > lo) & (a < hi)
            nc = tl.sum(cand.to(tl.int32), axis=0)
            if nc > 0:
                slot0 = tl.atomic_add(cnt_ptr + p * 4 + 3, nc.to(tl.int64))
                idx = slot0 + (tl.cumsum(cand.to(tl.int32), axis=0) - 1).to(tl.int64)
                ok = cand & (idx < tl.load(ccap_ptr + p))
                cb = tl.load(cbase_ptr + p)
                tl.store(cand_val + cb + idx, a, mask=ok)
                tl.store(cand_pos + cb + idx, offs, mask=ok)
    g = tl.where(s > 0, 1.0, tl.where(s < 0, -1.0, 0.0)).to(ACC)
    cancel = m & (g == 0.0) & (nz | _majority_zero(b, MODE, ACC))
    if MAJ_ALL:
        g = tl.where(cancel, majority, g).to(ACC)
    else:
        tally += tl.where(m, _sign_i(s), 0)
    pos_side = g > 0.0
    if MODE == 2:
        mx = tl.where(pos_side, acc_p, tl.where(g < 0.0, acc_n, 0.0))
        merged = mx * g
    else:
        sel_sum = tl.where(pos_side, acc_p, tl.where(g < 0.0, acc_n, 0.0))
        if MODE == 1:
            merged = sel_sum
        else:
            sel_cnt = tl.where(pos_side, cnt_p, tl.where(g < 0.0, cnt_n, 0.0))
            merged = _div(sel_sum, tl.maximum(sel_cnt, 1.0), ACC)
    res = C.to_out(b + lam_a * merged, out_ptr)
    optrs = out_ptr + offs
    if ALIGNED:
        optrs = tl.multiple_of(optrs, 16)
    if MAJ_ALL:
        tl.store(optrs, res, mask=cancel)
    else:
        if MASKED:
            tl.store(optrs, res, mask=m)
        else:
            tl.store(optrs, res)
        ncan = tl.sum(cancel.to(tl.int32), axis=0)
        if ncan > 0:
            slot0 = tl.atomic_add(ccnt_ptr, ncan.to(tl.int64))
            idx = slot0 + (tl.cumsum(cancel.to(tl.int32), axis=0) - 1).to(tl.int64)
            ok = cancel & (idx < CCAP)
            tl.store(cpos_ptr + idx, offs, mask=ok)
            tl.store(cseg_ptr + idx, tl.zeros([BLOCK], dtype=tl.int64) + seg, mask=ok)
    return bad, below_p, eqlo_p, eqhi_p, below_acc, eqlo_acc, eqhi_acc, tally


@C.autotune(
    # BLOCK >= 1024 keeps an item (CHUNK entries) within 16 steps, as the packed counters need
    configs=[
        triton.Config({"BLOCK": 1024}, num_warps=4),
        triton.Config({"BLOCK": 1024}, num_warps=8),
        triton.Config({"BLOCK": 2048}, num_warps=8),
        triton.Config({"BLOCK": 4096}, num_warps=8),
        triton.Config({"BLOCK": 4096}, num_warps=16),
    ],
    key=["T", "S", "MODE", "HAS_W", "COLLECT", "MAJ_ALL", "ALIGNED"],
    reset_to_zero=["cnt_ptr", "tally_ptr", "ccnt_ptr", "flag_ptr"],
)
@triton.jit
def _ties_pass(tab, b_ptr, out_ptr, w_ptr, lam_ptr,
               item_seg, item_start, item_end,
               c_ptr, lo_ptr, hi_ptr, cnt_ptr, cand_val, cand_pos, cbase_ptr, ccap_ptr,
               tally_ptr, cpos_ptr, cseg_ptr, ccnt_ptr, CCAP, flag_ptr,
               S, T: tl.constexpr, TP: tl.constexpr, MODE: tl.constexpr, HAS_W: tl.constexpr,
               COLLECT: tl.constexpr, MAJ_ALL: tl.constexpr, ACC: tl.constexpr, PACKED: tl.constexpr,
               ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """The fused trim / elect / disjoint-merge pass over one work item.

    MAJ_ALL: a recovery pass after the cancelled-positions list overflowed; it rewrites only the
    positions whose sum cancelled, with the majority sign read from the tally.
    """
    pid = tl.program_id(0).to(tl.int64)
    seg = tl.load(item_seg + pid)
    start = tl.load(item_start + pid)
    end = tl.load(item_end + pid)
    rows = tl.arange(0, TP)
    rmask = rows < T
    # bracket counts: with PACKED, per-entry 5-bit counters of all tasks packed in one int64
    # (an item has at most 16 steps), summed once per item instead of once per step and task
    below_p = tl.zeros([BLOCK], dtype=tl.int64)
    eqlo_p = tl.zeros([BLOCK], dtype=tl.int64)
    eqhi_p = tl.zeros([BLOCK], dtype=tl.int64)
    below_acc = tl.zeros([TP], dtype=tl.int64)
    eqlo_acc = tl.zeros([TP], dtype=tl.int64)
    eqhi_acc = tl.zeros([TP], dtype=tl.int64)
    tally = tl.zeros([BLOCK], dtype=tl.int64)
    bad = tl.zeros([BLOCK], dtype=tl.int1)
    majority = 0.0
    if MAJ_ALL:
        tv = tl.load(tally_ptr)
        majority = tl.where(tv > 0, 1.0, tl.where(tv < 0, -1.0, 0.0))
    lam_a = tl.load(lam_ptr)
    full_end = start + ((end - start) // BLOCK) * BLOCK
    for i0 in range(start, full_end, BLOCK):
        bad, below_p, eqlo_p, eqhi_p, below_acc, eqlo_acc, eqhi_acc, tally = _pass_step(
            i0, end, seg, tab, b_ptr, out_ptr, w_ptr, lam_a, majority, c_ptr, lo_ptr, hi_ptr, cnt_ptr, cand_val, cand_pos, cbase_ptr, ccap_ptr, ccnt_ptr, cpos_ptr, cseg_ptr, CCAP, rows, bad, below_p, eqlo_p, eqhi_p, below_acc, eqlo_acc, eqhi_acc, tally, S, T, MODE, HAS_W, COLLECT, MAJ_ALL, ACC, PACKED, ALIGNED, False, BLOCK)
    if full_end < end:
        bad, below_p, eqlo_p, eqhi_p, below_acc, eqlo_acc, eqhi_acc, tally = _pass_step(
            full_end, end, seg, tab, b_ptr, out_ptr, w_ptr, lam_a, majority, c_ptr, lo_ptr, hi_ptr, cnt_ptr, cand_val, cand_pos, cbase_ptr, ccap_ptr, ccnt_ptr, cpos_ptr, cseg_ptr, CCAP, rows, bad, below_p, eqlo_p, eqhi_p, below_acc, eqlo_acc, eqhi_acc, tally, S, T, MODE, HAS_W, COLLECT, MAJ_ALL, ACC, PACKED, ALIGNED, True, BLOCK)
    if not MAJ_ALL:
        tl.atomic_add(tally_ptr, tl.sum(tally, axis=0))
    nbad = tl.sum(bad.to(tl.int32), axis=0)
    if nbad > 0:
        tl.store(flag_ptr, 1)
    if COLLECT:
        if PACKED:
            for t in tl.static_range(T):
                below_acc += tl.where(rows == t, tl.sum((below_p >> (5 * t)) & 31, axis=0), 0)
                eqlo_acc += tl.where(rows == t, tl.sum((eqlo_p >> (5 * t)) & 31, axis=0), 0)
                eqhi_acc += tl.where(rows == t, tl.sum((eqhi_p >> (5 * t)) & 31, axis=0), 0)
        pr = rows * S + seg
        tl.atomic_add(cnt_ptr + pr * 4 + 0, below_acc, mask=rmask)
        tl.atomic_add(cnt_ptr + pr * 4 + 1, eqlo_acc, mask=rmask)
        tl.atomic_add(cnt_ptr + pr * 4 + 2, eqhi_acc, mask=rmask)


@triton.jit
def _div(a, b, ACC: tl.constexpr):
    # IEEE-rounded division as in PyTorch: Triton's float32 '/' is approximate on the GPU, and
    # div_rn is float32-only (float64 '/' is already correctly rounded)
    if ACC == tl.float64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def _entry(tab, b_ptr, w_ptr, pos, seg, m, thr_ptr, S, T: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr):
    """Task-order sum s and 'some kept entry is nonzero' at gathered positions, thresholds thr."""
    b = tl.load(b_ptr + pos, mask=m, other=0.0).to(ACC)
    s = tl.zeros(pos.shape, dtype=ACC)
    nz = tl.zeros(pos.shape, dtype=tl.int1)
    for t in tl.static_range(T):
        x = tl.load(C.task_ptr(tab, t, b_ptr) + pos, mask=m, other=0.0)
        tau = _tau(x, b, w_ptr, t, HAS_W, ACC)
        thr = tl.load(thr_ptr + t * S + seg, mask=m, other=0.0)
        tr = tl.where(tl.abs(tau) >= thr, tau, 0.0)
        s = s + tr
        nz = nz | (tr != 0.0)
    return b, s, nz


@triton.jit
def _merge_at(tab, b_ptr, w_ptr, pos, seg, m, thr_ptr, g, b, lam_a, S, T: tl.constexpr, MODE: tl.constexpr,
              HAS_W: tl.constexpr, ACC: tl.constexpr):
    acc = tl.zeros(pos.shape, dtype=ACC)
    cnt = tl.zeros(pos.shape, dtype=ACC)
    for t in tl.static_range(T):
        x = tl.load(C.task_ptr(tab, t, b_ptr) + pos, mask=m, other=0.0)
        tau = _tau(x, b, w_ptr, t, HAS_W, ACC)
        thr = tl.load(thr_ptr + t * S + seg, mask=m, other=0.0)
        tr = tl.where(tl.abs(tau) >= thr, tau, 0.0)
        sel = tr * g > 0.0
        if MODE == 2:
            acc = tl.maximum(acc, tl.where(sel, tl.abs(tr), 0.0))
        else:
            acc = acc + tl.where(sel, tr, 0.0)
            cnt = cnt + tl.where(sel, 1.0, 0.0)
    if MODE == 2:
        merged = acc * g
    elif MODE == 1:
        merged = acc
    else:
        merged = _div(acc, tl.maximum(cnt, 1.0), ACC)
    return b + lam_a * merged


@triton.jit
def _ties_fixup(tab, b_ptr, out_ptr, w_ptr, lam_ptr, c_ptr, thr_ptr, cnt_ptr, cand_val, cand_pos, cbase_ptr, ccap_ptr,
                tally_ptr, cpos_ptr, cseg_ptr, ccnt_ptr, CCAP,
                S, T: tl.constexpr, MODE: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr,
                BLOCK: tl.constexpr):
    """Recompute the positions whose trim decision changed between the guess c and the exact
    threshold; each position is owned by its lowest task with a changed decision."""
    p = tl.program_id(0).to(tl.int64)
    t_own = p // S
    seg = p % S
    n = tl.minimum(tl.load(cnt_ptr + p * 4 + 3), tl.load(ccap_ptr + p))
    cb = tl.load(cbase_ptr + p)
    c = tl.load(c_ptr + p)
    thr = tl.load(thr_ptr + p)
    # chunks of BLOCK candidates, strided over the (bounded) second grid dimension
    for j0 in range(tl.program_id(1).to(tl.int64) * BLOCK, n, tl.num_programs(1).to(tl.int64) * BLOCK):
        _fixup_chunk(tab, b_ptr, out_ptr, w_ptr, lam_ptr, c_ptr, thr_ptr, cand_val, cand_pos, cb, n, j0, c, thr,
                     t_own, seg, tally_ptr, cpos_ptr, cseg_ptr, ccnt_ptr, CCAP, S, T, MODE, HAS_W, ACC, BLOCK)


@triton.jit
def _fixup_chunk(tab, b_ptr, out_ptr, w_ptr, lam_ptr, c_ptr, thr_ptr, cand_val, cand_pos, cb, n, j0, c, thr,
                 t_own, seg, tally_ptr, cpos_ptr, cseg_ptr, ccnt_ptr, CCAP, S, T: tl.constexpr, MODE: tl.constexpr,
                 HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    j = j0 + tl.arange(0, BLOCK).to(tl.int64)
    m = j < n
    v = tl.load(cand_val + cb + j, mask=m, other=0.0)
    m = m & ((v >= c) != (v >= thr))
    if tl.sum(m.to(tl.int32), axis=0) > 0:
        pos = tl.load(cand_pos + cb + j, mask=m, other=0)
        segv = tl.zeros([BLOCK], dtype=tl.int64) + seg
        # ownership: no lower task's decision flipped at this position
        b = tl.load(b_ptr + pos, mask=m, other=0.0).to(ACC)
        owner = m
        for t in tl.static_range(T):
            x = tl.load(C.task_ptr(tab, t, b_ptr) + pos, mask=m, other=0.0)
            a = tl.abs(_tau(x, b, w_ptr, t, HAS_W, ACC))
            ct = tl.load(c_ptr + t * S + seg)
            tt = tl.load(thr_ptr + t * S + seg)
            flip = (a >= ct) != (a >= tt)
            owner = owner & ((flip.to(tl.int32) * (t_own > t).to(tl.int32)) == 0)
        _, s_old, _ = _entry(tab, b_ptr, w_ptr, pos, segv, owner, c_ptr, S, T, HAS_W, ACC)
        _, s_new, nz = _entry(tab, b_ptr, w_ptr, pos, segv, owner, thr_ptr, S, T, HAS_W, ACC)
        d = tl.where(owner, _sign_i(s_new) - _sign_i(s_old), 0)
        tl.atomic_add(tally_ptr, tl.sum(d, axis=0))
        g = tl.where(s_new > 0, 1.0, tl.where(s_new < 0, -1.0, 0.0)).to(ACC)
        res = _merge_at(tab, b_ptr, w_ptr, pos, segv, owner, thr_ptr, g, b, tl.load(lam_ptr), S, T, MODE, HAS_W, ACC)
        tl.store(out_ptr + pos, C.to_out(res, out_ptr), mask=owner)
        cancel = owner & (g == 0.0) & (nz | _majority_zero(b, MODE, ACC))
        ncan = tl.sum(cancel.to(tl.int64), axis=0)
        if ncan > 0:
            slot0 = tl.atomic_add(ccnt_ptr, ncan)
            idx = slot0 + tl.cumsum(cancel.to(tl.int64), axis=0) - 1
            ok = cancel & (idx < CCAP)
            tl.store(cpos_ptr + idx, pos, mask=ok)
            tl.store(cseg_ptr + idx, segv, mask=ok)


@triton.jit
def _ties_majority(tab, b_ptr, out_ptr, w_ptr, lam_ptr, thr_ptr, tally_ptr, cpos_ptr, cseg_ptr, ccnt_ptr, CCAP,
                   S, T: tl.constexpr, MODE: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr,
                   BLOCK: tl.constexpr):
    """Rewrite the listed cancelled positions with the majority sign."""
    pid = tl.program_id(0).to(tl.int64)
    n = tl.minimum(tl.load(ccnt_ptr), CCAP)
    j = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    m = j < n
    if tl.sum(m.to(tl.int32), axis=0) > 0:
        pos = tl.load(cpos_ptr + j, mask=m, other=0)
        seg = tl.load(cseg_ptr + j, mask=m, other=0)
        tv = tl.load(tally_ptr)
        majority = tl.where(tv > 0, 1.0, tl.where(tv < 0, -1.0, 0.0))
        b, s, nz = _entry(tab, b_ptr, w_ptr, pos, seg, m, thr_ptr, S, T, HAS_W, ACC)
        m = m & (s == 0.0) & (nz | _majority_zero(b, MODE, ACC))  # still needs it, exact thresholds
        g = (tl.zeros([BLOCK], dtype=ACC) + majority).to(ACC)
        res = _merge_at(tab, b_ptr, w_ptr, pos, seg, m, thr_ptr, g, b, tl.load(lam_ptr), S, T, MODE, HAS_W, ACC)
        tl.store(out_ptr + pos, C.to_out(res, out_ptr), mask=m)


@triton.jit
def _key(a, KEYT: tl.constexpr):
    # non-negative floats order like their bit patterns read as signed integers
    return a.to(KEYT, bitcast=True).to(tl.int64)


@triton.jit
def _hist_full(tab, b_ptr, w_ptr, item_seg, item_start, item_end, prefix_ptr, active_ptr, hist_ptr,
               SHIFT, SHIFT_HI, S, T: tl.constexpr, TP: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr,
               KEYT: tl.constexpr, BLOCK: tl.constexpr):
    """Radix-select round over the whole data: per problem, the histogram of the 8-bit digit at
    SHIFT of the |τ| keys whose higher bits equal the problem's prefix."""
    pid = tl.program_id(0).to(tl.int64)
    seg = tl.load(item_seg + pid)
    start = tl.load(item_start + pid)
    end = tl.load(item_end + pid)
    rows = tl.arange(0, TP)
    bins = tl.arange(0, 256)
    h = tl.zeros([TP, 256], dtype=tl.int32)
    for i0 in range(start, end, BLOCK):
        offs = i0 + tl.arange(0, BLOCK).to(tl.int64)
        m = offs < end
        b = tl.load(b_ptr + offs, mask=m, other=0.0).to(ACC)
        for t in tl.static_range(T):
            p = t * S + seg
            if tl.load(active_ptr + p) != 0:
                x = tl.load(C.task_ptr(tab, t, b_ptr) + offs, mask=m, other=0.0)
                key = _key(tl.abs(_tau(x, b, w_ptr, t, HAS_W, ACC)), KEYT)
                ok = m & ((key >> SHIFT_HI) == tl.load(prefix_ptr + p))
                dig = tl.where(ok, (key >> SHIFT) & 255, 0).to(tl.int32)
                hr = tl.histogram(dig, 256)
                hr = hr - tl.where(bins == 0, tl.sum((~ok).to(tl.int32), axis=0), 0)
                h += tl.where(rows[:, None] == t, hr[None, :], 0)
    pr = rows * S + seg
    # int64 counters: one segment may hold more than 2^31 entries
    tl.atomic_add(hist_ptr + pr[:, None] * 256 + bins[None, :], h.to(tl.int64), mask=(rows[:, None] < T) & (h != 0))


@triton.jit
def _hist_cand(cand_val, n_ptr, cbase_ptr, ccap_ptr, base_key_ptr, prefix_ptr, active_ptr, hist_ptr, SHIFT, SHIFT_HI,
               SPAN, KEYT: tl.constexpr, BLOCK: tl.constexpr):
    """Radix-select round over the candidate buffer (keys relative to the bracket's lo): each
    program histograms SPAN candidates of one problem in registers, then adds its 256 counts."""
    p = tl.program_id(0).to(tl.int64)
    if tl.load(active_ptr + p) != 0:
        n = tl.minimum(tl.load(n_ptr + p * 4 + 3), tl.load(ccap_ptr + p))
        cb = tl.load(cbase_ptr + p)
        bk = tl.load(base_key_ptr + p)
        pre = tl.load(prefix_ptr + p)
        bins = tl.arange(0, 256)
        h = tl.zeros([256], dtype=tl.int64)
        # SPAN-sized spans of candidates, strided over the (bounded) second grid dimension
        for j0 in range(tl.program_id(1).to(tl.int64) * SPAN, n, tl.num_programs(1).to(tl.int64) * SPAN):
            for jj in range(j0, tl.minimum(j0 + SPAN, n), BLOCK):
                j = jj + tl.arange(0, BLOCK).to(tl.int64)
                m = j < n
                v = tl.load(cand_val + cb + j, mask=m, other=0.0)
                key = _key(v, KEYT) - bk
                ok = m & ((key >> SHIFT_HI) == pre)
                dig = tl.where(ok, (key >> SHIFT) & 255, 0).to(tl.int32)
                hr = tl.histogram(dig, 256)
                h += (hr - tl.where(bins == 0, tl.sum((~ok).to(tl.int32), axis=0), 0)).to(tl.int64)
        tl.atomic_add(hist_ptr + p * 256 + bins, h, mask=h != 0)


# ---------------------------------------------------------------- host side

def _tl_dtype(dt: torch.dtype):
    return {torch.float32: tl.float32, torch.float64: tl.float64}[dt]


def _radix_rounds(hist_launch, P, nbits, rank, device):
    """Run radix-select rounds of 8 bits from the top of ``nbits``; return the selected keys [P]
    (relative to whatever base the histogram kernel subtracts). ``rank`` is 1-indexed [P] int64."""
    prefix = torch.zeros(P, dtype=torch.int64, device=device)
    rank = rank.clone()
    rounds = max(1, (nbits + 7) // 8)
    for r in range(rounds - 1, -1, -1):
        shift = 8 * r
        shift_hi = min(shift + 8, 63)
        hist = torch.zeros(P, NB, dtype=torch.int64, device=device)
        hist_launch(prefix, hist, shift, shift_hi)
        cum = hist.cumsum(1)
        digit = (cum < rank[:, None]).sum(1).clamp(max=NB - 1)
        before = torch.where(digit > 0, cum.gather(1, (digit - 1).clamp(min=0)[:, None])[:, 0],
                             torch.zeros_like(digit))
        rank = rank - before
        prefix = prefix * NB + digit
    return prefix


def _keys_to_values(keys: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    if acc == torch.float64:
        return keys.view(torch.float64).clone()
    return keys.to(torch.int32).view(torch.float32).clone()


def _sample(b, xs, w, starts, sizes, m_s, M, acc, device):
    """Sorted stratified samples [T, S, M] of |τ| (padded with +inf beyond each m_s)."""
    S = sizes.numel()
    j = torch.arange(M, dtype=torch.int64, device=device)[None, :]
    n = sizes.to(device)[:, None]
    ms = m_s.to(device)[:, None]
    sidx = torch.arange(S, dtype=torch.int64, device=device)[:, None]
    # deterministic jitter inside each stratum; zero when the segment is sampled whole
    r = (j * 2654435761 + sidx * 40503 + 12345) % n.clamp(min=1)
    pos = starts.to(device)[:, None] + (j * n + r) // ms.clamp(min=1)
    valid = j < ms
    pos = torch.where(valid, pos, torch.zeros_like(pos))
    bb = b[pos].to(acc)
    out = torch.empty((len(xs), S, M), dtype=acc, device=device)
    inf = torch.tensor(float("inf"), dtype=acc, device=device)
    for t, x in enumerate(xs):
        tau = x[pos].to(acc) - bb
        if w is not None:
            tau = tau * w[t]
        out[t] = torch.where(valid, tau.abs(), inf)
    return out.sort(dim=2).values


def merge_ties(base, thetas, density: float, lam: float, mode: int, offsets, weights, strategy: int = 0,
               overflow_msg: str | None = None):
    """TIES-Merging of flat 1-D tensors on the Triton backend; see the module docstring.

    ``overflow_msg``: the ValueError message when no input is NaN/Inf but a weighted task vector
    overflowed to infinity.
    """
    b = base if base.is_contiguous() else base.contiguous()
    xs = C.contiguous_tasks(thetas)
    device = b.device
    T = len(xs)
    d = b.numel()
    acc = C.acc_dtype(b.dtype)
    ACC = _tl_dtype(acc)
    KEYT = tl.int64 if acc == torch.float64 else tl.int32
    nbits_full = 63 if acc == torch.float64 else 31
    off = offsets.detach().to("cpu", torch.int64).contiguous()
    S = off.numel() - 1
    P = T * S
    sizes = off[1:] - off[:-1]
    starts = off[:-1]
    k = torch.tensor([V.ties_k(int(n), density) for n in sizes.tolist()], dtype=torch.int64)  # [S]
    k_p = k.repeat(T)  # problem p = t * S + s
    out = torch.empty_like(b)
    if d == 0:
        return out
    items = C.block_items(off, CHUNK, device)
    tab = C.pointer_table(xs, device)
    w = None if weights is None else C.small_tensor([float(v) for v in weights], acc, device)
    w_arg = w if w is not None else b  # never read when HAS_W is False
    lam_t = C.small_tensor([float(lam)], acc, device)
    TP = C.next_pow2(T)
    flag = C.new_flag(device)
    tally = torch.zeros(1, dtype=torch.int64, device=device)
    ccap = max(CANCEL_CAP_MIN, d // 64)
    cpos = torch.empty(ccap, dtype=torch.int64, device=device)
    cseg = torch.empty(ccap, dtype=torch.int64, device=device)
    ccnt = torch.zeros(1, dtype=torch.int64, device=device)
    cnt = torch.zeros(P, 4, dtype=torch.int64, device=device)
    named = C.named_inputs("base", b, "thetas", xs)
    common = dict(S=S, T=T, MODE=int(mode), HAS_W=w is not None, ACC=ACC)
    if not strategy:
        env = os.environ.get("FASTMERGE_TIES_STRATEGY", "").strip().lower()
        strategy = {"one-pass": 1, "two-pass": 2}.get(env, 1)
    dummy_i64 = cnt
    packed = T <= 12  # 5-bit counters of T tasks in one int64
    # 16-byte alignment of every row and of every item's first entry lets the compiler vectorise
    elt = b.element_size()
    aligned = (not C.INTERPRET) and C.all_aligned([b, out] + xs) and bool(
        (off[:-1] % max(1, 16 // elt) == 0).all()) and CHUNK % 16 == 0

    def run_pass(c, lo, hi, cand, collect, maj_all=False):
        cv, cp, cbase, ccap_p = cand if cand is not None else (out, cpos, dummy_i64, dummy_i64)
        args = (tab, b, out, w_arg, lam_t, items["block"], items["start"], items["end"],
                c, lo, hi, cnt, cv, cp, cbase, ccap_p, tally, cpos, cseg, ccnt, ccap, flag)
        grid = (items["num_items"],)
        if maj_all:  # reads the tally: must not be autotuned (benchmark runs reset it)
            fn = _ties_pass.fn
            fn[grid](*args, TP=TP, COLLECT=False, MAJ_ALL=True, PACKED=packed, ALIGNED=aligned, BLOCK=1024,
                     num_warps=4, **common, **C.LAUNCH)
        else:
            _ties_pass[grid](*args, TP=TP, COLLECT=collect, MAJ_ALL=False, PACKED=packed, ALIGNED=aligned,
                             **common, **C.LAUNCH)

    def finish(thr):
        """Majority-sign rewrite of the listed cancelled positions (or a full recovery pass)."""
        n_cancel = int(ccnt.item())
        if n_cancel > ccap:
            run_pass(thr, thr, thr, None, False, maj_all=True)
        elif n_cancel > 0:
            BL = 256
            _ties_majority[(triton.cdiv(n_cancel, BL),)](tab, b, out, w_arg, lam_t, thr, tally, cpos, cseg, ccnt,
                                                        ccap, BLOCK=BL, **common, **C.LAUNCH)
        _last_stats["cancelled"] = n_cancel

    def exact_thresholds():
        """Radix select over the whole data (one pass per 8-bit digit)."""
        active = (k_p > 0).to(torch.int32).to(device)
        rank = k_p.clamp(min=1).to(device)

        def launch(prefix, hist, shift, shift_hi):
            _hist_full[(items["num_items"],)](tab, b, w_arg, items["block"], items["start"], items["end"], prefix,
                                              active, hist, shift, shift_hi, S=S, T=T, TP=TP,
                                              HAS_W=w is not None, ACC=ACC, KEYT=KEYT, BLOCK=256, **C.LAUNCH)

        keys = _radix_rounds(launch, P, nbits_full, rank, device)
        thr = _keys_to_values(keys, acc)
        return torch.where(active.bool(), thr, torch.zeros_like(thr)).contiguous()

    _last_stats.clear()
    t_last = [time.perf_counter()]

    def mark(name):
        if PROFILE:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            _last_stats.setdefault("times_ms", {})[name] = round((now - t_last[0]) * 1e3, 3)
            t_last[0] = now

    mark("setup")
    if strategy != 2:
        plan = _bracket(b, xs, w, k, sizes, starts, T, acc, device)
        mark("sample")
        if plan is not None and plan["bytes"] > max(64 << 20, (T + 1) * d * b.element_size() // 8):
            _last_stats["bracket_skipped"] = f"candidate buffer of {plan['bytes'] >> 20} MiB"
            plan = None
    else:
        plan = None
    if plan is not None:
        c, lo, hi, cbase, capp = plan["c"], plan["lo"], plan["hi"], plan["cbase"], plan["cap"]
        total = int(plan["total"])
        cand_val = torch.empty(max(total, 1), dtype=acc, device=device)
        cand_pos = torch.empty(max(total, 1), dtype=torch.int64, device=device)
        cand = (cand_val, cand_pos, cbase, capp)
        run_pass(c, lo, hi, cand, True)
        mark("pass")
        stats = cnt.cpu()
        C.raise_if_flagged(flag, named, overflow_msg)
        below, eqlo, eqhi, ncand = (stats[:, i] for i in range(4))
        cap_cpu = capp.cpu()
        r = k_p - below
        in_lo = (r >= 1) & (r <= eqlo)
        in_cand = (r > eqlo) & (r <= eqlo + ncand)
        in_hi = (r > eqlo + ncand) & (r <= eqlo + ncand + eqhi)
        lo_c, c_c = lo.cpu(), c.cpu()
        # ties at lo were merged with the guess: fixable only if the exact threshold treats them alike
        lo_flip = (eqlo > 0) & ((lo_c >= c_c) != in_lo)
        ok = (k_p == 0) | ((in_lo | in_cand | in_hi) & ~lo_flip & (ncand <= cap_cpu))
        _last_stats.update(path="bracket", candidates=int(ncand.sum()), candidate_bytes=plan["bytes"],
                           sample=plan["M"])
        if bool(ok.all()):
            thr = torch.where(in_lo.to(device), lo, torch.where(in_hi.to(device), hi, c))
            thr = torch.where((k_p == 0).to(device), torch.zeros_like(thr), thr)
            need = in_cand & (k_p > 0)
            if bool(need.any()):
                base_key = _keys_of(lo, acc)
                span = torch.where(need.to(device), _keys_of(hi, acc) - base_key, torch.zeros_like(base_key))
                span = torch.where(torch.isinf(hi), torch.full_like(span, (1 << nbits_full) - 1), span)
                nbits = max(1, min(nbits_full, int(span.max()).bit_length()))
                active = need.to(torch.int32).to(device)
                rank = (r - eqlo).clamp(min=1).to(device)
                BL, SPAN = 1024, 16384
                nch = max(1, triton.cdiv(int(ncand[need].max()), SPAN))

                def launch(prefix, hist, shift, shift_hi):
                    _hist_cand[(P, min(nch, GRID_Y_MAX))](cand_val, cnt, cbase, capp, base_key, prefix, active, hist, shift,
                                         shift_hi, SPAN, KEYT=KEYT, BLOCK=BL, **C.LAUNCH)

                keys = _radix_rounds(launch, P, nbits, rank, device) + base_key
                thr = torch.where(need.to(device), _keys_to_values(keys, acc), thr)
            mark("select")
            thr = thr.contiguous()
            changed = bool((thr != c).any())
            if changed:
                BL = 1024
                nch = max(1, triton.cdiv(int(ncand.max()), BL))
                _ties_fixup[(P, min(nch, GRID_Y_MAX))](tab, b, out, w_arg, lam_t, c, thr, cnt, cand_val, cand_pos, cbase, capp,
                                      tally, cpos, cseg, ccnt, ccap, BLOCK=BL, **common, **C.LAUNCH)
            _last_stats["fixup"] = changed
            mark("fixup")
            del cand_val, cand_pos
            finish(thr)
            mark("majority")
            return out
        _last_stats["path"] = "bracket-missed"
        del cand_val, cand_pos
        cnt.zero_()
        tally.zero_()
        ccnt.zero_()
    # exact path: radix select over the whole data, then the pass with the exact thresholds
    thr = exact_thresholds()
    mark("exact_select")
    run_pass(thr, thr, thr, None, False)
    C.raise_if_flagged(flag, named, overflow_msg)
    mark("exact_pass")
    _last_stats.setdefault("path", "exact")
    finish(thr)
    mark("majority")
    return out


def _keys_of(v: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    return v.view(torch.int64).clone() if acc == torch.float64 else v.view(torch.int32).to(torch.int64)


def _bracket(b, xs, w, k, sizes, starts, T, acc, device):
    """Guess, bracket and candidate capacity of every problem from a sorted sample (no sync)."""
    S = sizes.numel()
    m_max = SAMPLE_MAX if S == 1 else SAMPLE_MAX_TENSOR
    # the padded sample is T x S x M values (and the sort's indices): keep it to SAMPLE_BUDGET
    m_max = max(1, min(m_max, SAMPLE_BUDGET // max(1, T * S)))
    m_s = torch.minimum(sizes, torch.full_like(sizes, m_max))
    M = max(1, int(m_s.max()))
    samp = _sample(b, xs, w, starts, sizes, m_s, M, acc, device)  # [T, S, M] sorted
    whole = m_s == sizes
    msd = m_s.double().clamp(min=1)
    q = k.double() / sizes.clamp(min=1).double()
    sd = torch.sqrt(msd * q * (1 - q)).clamp(min=1.0)
    gi = torch.where(whole, k - 1, (q * msd).ceil().long() - 1)
    li = torch.where(whole, k - 1, (q * msd - Z * sd - 2).floor().long())
    hi_i = torch.where(whole, k - 1, (q * msd + Z * sd + 1).ceil().long())
    idx = torch.stack([gi.clamp(0, M - 1), li.clamp(0, M - 1), hi_i.clamp(0, M - 1)], 1).to(device)  # [S, 3]
    vals = samp.gather(2, idx[None].expand(T, S, 3))  # [T, S, 3]
    zero = torch.zeros((), dtype=acc, device=device)
    inf = torch.tensor(float("inf"), dtype=acc, device=device)
    lo_open = (li < 0).to(device)[None, :]
    hi_open = ((hi_i >= m_s) & ~whole).to(device)[None, :]
    keep_all = (k == 0).to(device)[None, :]
    c = torch.where(keep_all, zero, vals[..., 0])
    lo = torch.where(keep_all | lo_open, zero, vals[..., 1])
    hi = torch.where(keep_all, zero, torch.where(hi_open, inf, vals[..., 2]))
    # candidates expected strictly inside the bracket, from its sampled width, with a margin
    width = ((hi_i.clamp(max=M) - li.clamp(min=0)).double() / msd).clamp(min=0, max=1)
    expect = torch.where(whole | (k == 0), torch.zeros_like(width), width * sizes.double())
    cap_s = (expect * 1.3).long() + torch.where(whole, 0, 1024)
    cap_s = torch.minimum(cap_s, sizes)
    cap = cap_s.repeat(T)  # [P]
    cbase = torch.zeros_like(cap)
    cbase[1:] = torch.cumsum(cap, 0)[:-1]
    total = int(cap.sum())
    elt = 16 if acc == torch.float64 else 12
    return {"c": c.reshape(-1).contiguous(), "lo": lo.reshape(-1).contiguous(), "hi": hi.reshape(-1).contiguous(),
            "cbase": cbase.to(device), "cap": cap.to(device), "total": total, "bytes": total * elt, "M": M}
