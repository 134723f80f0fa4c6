"""Exact magnitude selection: which entries of each model's delta a sparsifying method keeps.

A model keeps the entries of ranks [lo, hi) in the ascending order of |delta| (delta = float(theta) -
float(base), in float32), ties ordered by index, or by descending index where ``by_high`` (mergekit's
descending top-k keeps the lowest indices among equal magnitudes). The result is a keep rule per model
that the fused merge pass applies entry by entry (``_C.ckpt_merge``)::

    [lo_key, lo_a, lo_b, hi_key, hi_a, hi_b]

where a key is the float32 bits of |delta| (they order like the values): an entry is kept when
lo_key < key < hi_key, or key == lo_key and lo_a <= index <= lo_b, or key == hi_key and
hi_a <= index <= hi_b.

On a tensor whose inputs fit the memory budget (``resident``; by default one chunk) and of at least
``SAMPLE_FROM`` entries, the boundary keys come from one pass
(``_C.ckpt_key_bracket``): a sample of the entries (the same share of every row, where the caller gives
the row length) brackets each boundary's key, and the pass counts the keys above the bracket and records
the keys in it, which gives the exact key and where its ties are.
Where a bracket misses (the sample was not like the whole), and on other tensors, they come from two
passes of per-model histograms (``_C.ckpt_key_hist``): the top 16 bits of every key, then the low 16
bits inside the bin that holds the rank. The second pass also records where the entries of that bin
are (when there are at most 2^22 of them), which is how a tie at the boundary is split by index
without another pass. Both passes run chunk by chunk, and for a tensor of several chunks they hand each
chunk to ``release``, so the pages of a large tensor leave the process as they are read.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

BINS = 1 << 16
NO_LOWER = -1
NO_UPPER = 1 << 32
KEEP_NONE = 1 << 33
RECORD_LIMIT = 1 << 22
NEVER = 1 << 20  # a prefix no key has: the model is skipped in that pass
INDEX_MASK = (1 << 40) - 1
SAMPLE_FROM = 1 << 18  # tensors of one chunk and at least this many entries try the sampled brackets
SAMPLE_MARGIN = 3.5  # a bracket: the sample's ranks within this many standard deviations (plus 32)


def pick(row: Tensor, rank: int) -> Tuple[int, int, int]:
    """The bin of a histogram row that holds the 0-based ``rank``: (bin, count below it, its count)."""
    cum = torch.cumsum(row, 0)
    d = int(torch.searchsorted(cum, rank, right=True))
    below = int(cum[d - 1]) if d > 0 else 0
    return d, below, int(row[d])


def _kept_ties(rank: int, below: int, equal: int, lower: bool, by_high: bool) -> Tuple[int, int]:
    """Positions (in index order, inclusive) of the kept entries among the ``equal`` ones at a boundary."""
    if lower:
        kept = below + equal - rank
        return (0, kept - 1) if by_high else (equal - kept, equal - 1)
    kept = rank + 1 - below
    return (equal - kept, equal - 1) if by_high else (0, kept - 1)


def _boundary(key: int, below: int, equal: int, rank: int, lower: bool, by_high: bool, n: int,
              positions: Callable[[], Tensor]) -> List[int]:
    """[key, first, last] of a boundary whose key has ``below`` keys under it and ``equal`` equal to
    it; ``positions()`` gives the ascending indices of the equal ones, asked for only when the tie is
    split."""
    first, last = 0, n - 1
    k_from, k_to = _kept_ties(rank, below, equal, lower, by_high)
    if key != 0 and (k_from > 0 or k_to < equal - 1):  # a split tie (ties at zero change nothing)
        idx = positions()
        first = int(idx[k_from]) if k_from > 0 else 0
        last = int(idx[k_to]) if k_to < equal - 1 else n - 1
    return [key, first, last]


def exact_boundary(row: Tensor, where: Optional[Tensor], coarse: Tuple[int, int, int], rank: int, lower: bool,
                   by_high: bool, n: int, tie_positions: Callable[[int], Tensor]) -> List[int]:
    """[key, first, last] of a boundary, from the low-16-bit histogram ``row`` of its top-16-bit bin
    (``coarse`` = (bin, count below the bin, count in it)) and the recorded positions ``where`` of that
    bin's entries (low 16 bits << 40 | index), or ``tie_positions(key)`` when they were not recorded."""
    bin_, below, _ = coarse
    d, below2, equal = pick(row, rank - below)
    key = (bin_ << 16) | d

    def positions() -> Tensor:
        if where is None:
            return tie_positions(key)
        return where[(where >> 40) == d] & INDEX_MASK  # the records come in ascending index order

    return _boundary(key, below + below2, equal, rank, lower, by_high, n, positions)


def _bounds(rank_lo: Sequence[int], rank_hi: Sequence[int], n: int):
    """The keep-all rules of T models, and their boundaries (model, rank, lower) for ranks [lo, hi)."""
    rules = [[NO_LOWER, 0, n - 1, NO_UPPER, 0, n - 1] for _ in range(len(rank_lo))]
    bounds: List[Tuple[int, int, bool]] = []
    for t in range(len(rank_lo)):
        lo, hi = int(rank_lo[t]), int(rank_hi[t])
        if not 0 <= lo <= hi <= n:
            raise ValueError(f"ranks of model {t} out of range: [{lo}, {hi}) of {n}")
        if lo == hi:
            rules[t][0] = KEEP_NONE
            continue
        if lo > 0:
            bounds.append((t, lo, True))
        if hi < n:
            bounds.append((t, hi - 1, False))
    return rules, bounds


def bracket_rules(C, base: Tensor, thetas: Sequence[Tensor], rank_lo: Sequence[int], rank_hi: Sequence[int],
                  by_high: Sequence[bool], row: int = 0) -> Optional[Tensor]:
    """The keep rules of :func:`select_rules` for a whole tensor in one pass (``_C.ckpt_key_bracket``),
    or None where a sampled bracket missed its boundary (the caller then takes the exact passes). ``row``:
    the length of the tensor's rows (0: none), by which the sample is stratified."""
    n = base.numel()
    rules, bounds = _bounds(rank_lo, rank_hi, n)
    if bounds:
        res = C.ckpt_key_bracket(base, list(thetas), [t for t, _, _ in bounds], [r for _, r, _ in bounds],
                                 SAMPLE_MARGIN, RECORD_LIMIT // 2, row)
        info = res[0].tolist()
        if any(key < 0 for key, _, _ in info):
            return None
        for j, ((t, rank, lower), (key, below, equal)) in enumerate(zip(bounds, info)):
            rules[t][0 if lower else 3: 3 if lower else 6] = _boundary(key, below, equal, rank, lower,
                                                                      bool(by_high[t]), n, lambda j=j: res[1 + j])
    return torch.tensor(rules, dtype=torch.int64)


def merge_top_k(C, base: Tensor, thetas: Sequence[Tensor], rank_lo: Sequence[int], by_high: Sequence[bool],
                weights: Sequence[float], rest: tuple, out: Tensor, row: int = 0) -> bool:
    """Top-k (each model keeps ranks [rank_lo, n)) merged in two passes instead of three.

    On a tensor of ``SAMPLE_FROM`` entries or more, the exact thresholds come from one pass over sampled
    brackets (:func:`bracket_rules`) and the merge pass follows. Otherwise, or when a bracket missed, the
    first histogram pass finds each model's threshold bin. The merge pass itself then runs with
    provisional rules that drop the whole bin while counting and locating the keys in it
    (``_C.ckpt_merge_deferred``). The exact rules follow from those counts, and only the entries where
    some model's key fell in its bin are merged again. ``rest`` holds ``ckpt_merge``'s arguments after
    ``rules``, up to ``out_dtype``; ``row`` is the length of the tensor's rows (0: none). Returns False,
    having done nothing, when the bins hold too many entries to record."""
    n, T = base.numel(), len(thetas)
    if n >= SAMPLE_FROM:
        rules = bracket_rules(C, base, thetas, rank_lo, [n] * T, by_high, row)
        if rules is not None:
            C.ckpt_merge(base, list(thetas), list(weights), rules, *rest, 0, out)
            return True
    h1 = C.ckpt_key_hist(base, list(thetas), [-1] * T, 0, False)[0]
    coarse = [pick(h1[t], int(rank_lo[t])) if rank_lo[t] > 0 else None for t in range(T)]
    if sum(c[2] for c in coarse if c) > RECORD_LIMIT:
        return False
    full = [NO_LOWER, 0, n - 1, NO_UPPER, 0, n - 1]
    provisional = torch.tensor([[(c[0] << 16) | 0xFFFF, 1, 0, NO_UPPER, 0, n - 1] if c else full for c in coarse],
                               dtype=torch.int64)
    res = C.ckpt_merge_deferred(base, list(thetas), list(weights), provisional, *rest, 0, out, None,
                                [c[0] if c else -1 for c in coarse])
    h2, where, idx = res[1], res[2:2 + T], res[2 + T]
    rules = [full[:] for _ in range(T)]
    for t, c in enumerate(coarse):
        if c is not None:
            rules[t][0:3] = exact_boundary(h2[t], where[t], c, int(rank_lo[t]), True, bool(by_high[t]), n,
                                           lambda key: None)  # every position was recorded
    if idx.numel():  # the entries some model's bin holds, merged again in place with the exact rules
        C.ckpt_merge_at(base, list(thetas), list(weights), torch.tensor(rules, dtype=torch.int64), *rest[:-1], out,
                        idx)
    return True


def select_rules(C, base: Tensor, thetas: Sequence[Tensor], rank_lo: Sequence[int], rank_hi: Sequence[int],
                 by_high: Sequence[bool], chunks: Sequence[Tuple[int, int]],
                 release: Optional[Callable[[int, int], None]] = None, row: int = 0,
                 resident: Optional[bool] = None) -> Tensor:
    """Keep rules (int64 [T, 6]) for entries of ranks [rank_lo[t], rank_hi[t]) of each model.

    Args:
        C: the compiled extension (``fastmerge._C``).
        base, thetas: flat contiguous tensors of one dtype.
        chunks: the [a, b) ranges the passes read at a time.
        release: called with each chunk's range after each pass reads it.
        row: the length of the tensor's rows (0: none), by which the sampled brackets are stratified.
        resident: whether the inputs fit the memory budget (default: when they are one chunk). Resident
            inputs stay mapped for the merge pass that follows, and the sampled brackets may find the
            rules in one pass over them; others are released chunk by chunk after each pass.
    """
    n, T = base.numel(), len(thetas)
    if resident is None:
        resident = len(chunks) < 2
    if resident:
        release = None  # the inputs stay mapped for the passes that follow (re-faulting them costs time)
    rules, bounds = _bounds(rank_lo, rank_hi, n)
    if not bounds:
        return torch.tensor(rules, dtype=torch.int64)
    if resident and n >= SAMPLE_FROM:
        got = bracket_rules(C, base, thetas, rank_lo, rank_hi, by_high, row)
        if got is not None:
            return got

    def sweep(prefix: List[int], record: bool):
        """One pass of histograms over the chunks; with ``record``, where the prefix bin's entries are;
        without, each chunk's histogram rows of the models asked (int32), so that a split tie is found by
        reading one chunk again (:class:`_ChunkedTies`)."""
        hist = torch.zeros(T, BINS, dtype=torch.int64)
        where: List[List[Tensor]] = [[] for _ in range(T)]
        rows: List[List[Tensor]] = [[] for _ in range(T)]
        asked = [t for t in range(T) if prefix[t] not in (-1, NEVER)]
        for a, b in chunks:
            out = C.ckpt_key_hist(base[a:b], [x[a:b] for x in thetas], prefix, a, record)
            hist += out[0]
            for t in range(T) if record else ():
                where[t].append(out[1 + t])
            for t in asked if not record and len(chunks) > 1 else ():
                rows[t].append(out[0][t].to(torch.int32))
            if release is not None:
                release(a, b)
        return hist, where, rows

    h1, _, _ = sweep([-1] * T, False)
    coarse = [pick(h1[t], rank) for t, rank, _ in bounds]
    # a model has at most two boundaries: the first of each model in one pass, the second in another
    layers: List[List[int]] = [[], []]
    seen = set()
    for j, (t, _, _) in enumerate(bounds):
        layers[t in seen].append(j)
        seen.add(t)
    for layer in filter(None, layers):
        prefix = [NEVER] * T
        for j in layer:
            prefix[bounds[j][0]] = coarse[j][0]
        record = sum(coarse[j][2] for j in layer) <= RECORD_LIMIT
        h2, where, rows = sweep(prefix, record)
        for j in layer:
            t, rank, lower = bounds[j]
            w = torch.cat(where[t]) if record else None

            def ties(key, t=t):
                if rows[t]:
                    return _ChunkedTies(base, thetas[t], key, chunks, [int(r[key & 0xFFFF]) for r in rows[t]], release)
                return _tie_positions(base, thetas[t], key, chunks, release)

            rules[t][0 if lower else 3: 3 if lower else 6] = exact_boundary(
                h2[t], w, coarse[j], rank, lower, bool(by_high[t]), n, ties)
    return torch.tensor(rules, dtype=torch.int64)


def _tie_positions(base: Tensor, theta: Tensor, key: int, chunks, release) -> Tensor:
    """Indices (ascending) of the entries whose |delta| has the float32 bits ``key`` (a third pass, for
    a boundary bin too crowded to record)."""
    out = []
    for a, b in chunks:
        out.append(_equal_in(base, theta, key, a, b))
        if release is not None:
            release(a, b)
    return torch.cat(out)


def _equal_in(base: Tensor, theta: Tensor, key: int, a: int, b: int) -> Tensor:
    keys = (theta[a:b].float() - base[a:b].float()).abs().view(torch.int32)
    return torch.nonzero(keys == key).reshape(-1) + a


class _ChunkedTies:
    """The ascending indices of the entries whose key is ``key``, as a sequence that reads one chunk
    again per look-up: ``counts[c]``, the number of such entries in chunk c (from the second pass's
    per-chunk histograms), tells which chunk holds the k-th. A boundary bin too crowded to record in a
    tensor of many chunks then costs a read of one or two chunks, not a third pass."""

    def __init__(self, base: Tensor, theta: Tensor, key: int, chunks, counts: List[int], release):
        self.base, self.theta, self.key, self.chunks, self.counts, self.release = base, theta, key, chunks, counts, release

    def __len__(self) -> int:
        return sum(self.counts)

    def __getitem__(self, k: int) -> int:
        if not 0 <= k < len(self):
            raise IndexError(k)
        for (a, b), c in zip(self.chunks, self.counts):
            if k < c:
                got = _equal_in(self.base, self.theta, self.key, a, b)
                if self.release is not None:
                    self.release(a, b)
                return int(got[k])
            k -= c
        raise IndexError(k)
