"""Pure-PyTorch reference twins of the checkpoint-merging methods, one function per formula.

These restate mergekit 0.1.5's formulas in plain tensor code (sorting, masks, stacked task vectors),
so they are slow and use O(T x n) memory per tensor. The fast paths in :mod:`fastmerge.merge.methods`
must match them: the discrete choices (which entries each model keeps) exactly, the values within
the tolerances of ``tests/test_merge_methods.py``. They also run the methods on CUDA tensors.

Conventions shared with the fast paths:
- every input is converted to float32 (float64 stays float64) before any arithmetic; the delta of a
  model is ``float(theta) - float(base)``;
- ties in a magnitude ranking are broken by index, as a stable sort does (mergekit's argsort on
  the CPU);
- the random methods draw from :mod:`fastmerge.merge.rng`, keyed per model and tensor.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import rng


def work(x: Tensor) -> Tensor:
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """Keep the k = max(1, int(density * n)) entries of largest |delta| (ties: lower index first)."""
    n = delta.numel()
    if density >= 1:
        return torch.ones(n, dtype=torch.bool, device=delta.device)
    k = max(1, int(density * n))
    order = torch.sort(delta.abs().reshape(-1).float(), descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[order[:k]] = True
    return mask


def outlier_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model breadcrumbs: drop the int(gamma * n) largest |delta| and keep the next int(density * n)."""
    n = delta.numel()
    if density >= 1:
        return torch.ones(n, dtype=torch.bool, device=delta.device)
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = torch.sort(delta.abs().reshape(-1).float(), descending=False, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[order[n_bot:n_bot + target]] = True
    return mask


def random_mask(delta: Tensor, density: float, key: int) -> Tensor:
    if density >= 1:
        return torch.ones(delta.numel(), dtype=torch.bool, device=delta.device)
    return rng.keep_mask(key, delta.numel(), density, delta.device)


def della_mask(delta: Tensor, density: float, epsilon: float, key: int) -> Tensor:
    """DELLA's MagPrune, as mergekit 0.1.5: the keep probability rises linearly with the rank of |delta|
    along dim 1 (a 1-D tensor is one row) from density - epsilon to density + epsilon."""
    if density >= 1:
        return torch.ones(delta.numel(), dtype=torch.bool, device=delta.device)
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    mags = rows.abs().float()
    order = torch.argsort(mags, dim=1, stable=True)
    ranks = torch.argsort(order, dim=1, stable=True).float() + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    return rng.keep_mask(key, delta.numel(), probs, delta.device)


def rescale_l1(delta: Tensor, mask: Tensor, eps: float = 1e-7) -> Tensor:
    """delta * mask, scaled to the L1 norm of delta (unless either norm is below eps)."""
    masked = delta * mask.reshape(delta.shape)
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def sparsify(delta: Tensor, method, p: dict, key: int, rescale: bool) -> Tensor:
    if method is None:
        return delta
    if isinstance(method, tuple):  # ("threshold", key): keep |delta| >= a given magnitude, ties included
        thr = torch.tensor(method[1], dtype=torch.int32).view(torch.float32).item()
        mask = delta.float().abs() >= thr
        return rescale_l1(delta, mask) if rescale else delta * mask
    d = float(p.get("density", 1.0))
    if d >= 1:
        return delta
    if method == "magnitude":
        mask = magnitude_mask(delta, d)
    elif method == "outliers":
        mask = outlier_mask(delta, d, float(p.get("gamma", 0.01)))
    elif method == "random":
        mask = random_mask(delta, d, key)
    elif method == "della":
        mask = della_mask(delta, d, float(p.get("epsilon", 0.15)), key)
    else:
        raise ValueError(f"unknown sparsification {method!r}")
    mask = mask.reshape(delta.shape)
    return rescale_l1(delta, mask) if rescale else delta * mask


def generalized_task_arithmetic(base: Tensor, thetas: Sequence[Tensor], per: Sequence[dict], *,
                                sparsification: Optional[str], consensus: Optional[str], normalize: bool,
                                rescale: bool, lam: float, keys: Sequence[int]) -> Tensor:
    """task_arithmetic, ties, dare_*, breadcrumbs*, della*: base + lam * merge(w_t * sparsify(theta_t - base))."""
    b = work(base)
    methods = sparsification if isinstance(sparsification, list) else [sparsification] * len(thetas)
    deltas = torch.stack([sparsify(work(th) - b, m, p, k, rescale) for th, m, p, k in zip(thetas, methods, per, keys)])
    weights = torch.tensor([float(p["weight"]) for p in per], dtype=deltas.dtype, device=deltas.device)
    weights = weights.reshape((-1,) + (1,) * b.dim())
    deltas = deltas * weights
    if consensus is not None:
        signs = deltas.sign()
        if consensus == "sum":
            majority = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
        else:
            majority = torch.where(signs.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
        agree = signs == majority
        mixed = (deltas * agree).sum(dim=0)
        divisor = (weights * agree).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return b + mixed


def linear(thetas: Sequence[Tensor], weights: Sequence[float], normalize: bool) -> Tensor:
    """sum_t w_t theta_t, divided by sum_t w_t when normalize."""
    acc = torch.zeros_like(work(thetas[0]))
    for th, w in zip(thetas, weights):
        acc = acc + work(th) * w
    if normalize:
        acc = acc / sum(float(w) for w in weights)
    return acc


SLERP_CHUNK = 1 << 20  # mergekit 0.1.5 forms the norms and the dot product 2^20 entries at a time


def slerp(t: float, v0: Tensor, v1: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation of the whole (flattened) tensor v0 towards v1, as mergekit 0.1.5 does;
    linear where the two are (anti)parallel. Norms at or below eps count as 1. As in mergekit, the norms
    are norms of per-chunk norms and the dot product a sum of per-chunk dots of the normalised chunks
    (in float32, a single float32 reduction over millions of entries drifts by 0.1 %)."""
    a = work(v0).reshape(-1)
    b = work(v1).reshape(-1)
    if a.numel() == 0:
        return a.reshape(v0.shape)
    pieces = list(zip(torch.split(a, SLERP_CHUNK), torch.split(b, SLERP_CHUNK)))
    na = torch.stack([torch.linalg.vector_norm(x) for x, _ in pieces]).norm()
    nb = torch.stack([torch.linalg.vector_norm(y) for _, y in pieces]).norm()
    na = torch.where(na > eps, na, torch.ones_like(na))
    nb = torch.where(nb > eps, nb, torch.ones_like(nb))
    dot = torch.stack([((x / na) * (y / nb)).sum() for x, y in pieces]).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    theta = torch.acos(dot)
    s = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / s * a + torch.sin(t * theta) / s * b).reshape(v0.shape)


def model_stock(base: Tensor, thetas: Sequence[Tensor], filter_wise: bool = False) -> Tensor:
    """Model Stock: t * mean(thetas) + (1 - t) * base, t = N cos / (1 + (N - 1) cos), cos the mean
    pairwise cosine of the task vectors (per row with filter_wise)."""
    w0 = work(base)
    ws = [work(x) for x in thetas]
    if filter_wise:
        w0r = w0.unsqueeze(0) if w0.dim() == 1 else w0
        wsr = [x.unsqueeze(0) if x.dim() == 1 else x for x in ws]
    else:
        w0r = w0.reshape(-1)
        wsr = [x.reshape(-1) for x in ws]
    offs = [x - w0r for x in wsr]
    cos = []
    for i in range(len(offs)):
        for j in range(i + 1, len(offs)):
            norm = torch.norm(offs[i], dim=-1) * torch.norm(offs[j], dim=-1)
            cos.append(((offs[i] * offs[j]).sum(dim=-1) / norm.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(den), den))
    avg = sum(wsr) / n
    return (t * avg + (1 - t) * w0r).reshape(base.shape)


def passthrough(x: Tensor, scale: Optional[float]) -> Tensor:
    return x if scale is None else work(x) * scale


def global_threshold(deltas: Sequence[Tensor], density: float) -> int:
    """scope: global: the magnitude key (float32 bits of |delta|) of the k-th largest |delta| over all of
    a model's tensors, k = max(1, int(density * n)) (every entry at or above it is kept)."""
    mags = torch.cat([d.reshape(-1).float().abs() for d in deltas])
    n = mags.numel()
    k = max(1, int(density * n))
    v = torch.kthvalue(mags, n - k + 1).values
    return int(v.view(torch.int32))


def nonfinite_index(x: Tensor) -> Optional[int]:
    bad = ~torch.isfinite(x.reshape(-1))
    if bool(bad.any()):
        return int(bad.nonzero()[0])
    return None


__all__: List[str] = ["generalized_task_arithmetic", "linear", "slerp", "model_stock", "passthrough", "sparsify",
                      "magnitude_mask", "outlier_mask", "random_mask", "della_mask", "rescale_l1", "work"]
