"""Pure-PyTorch reference twins of every fastmerge op.

These are written for reading, not for speed: they stack the task vectors into [T, d] tensors the
way published merging code does, and they spell out every summation order that the fused kernels
must reproduce. Every backend is tested against them (discrete results such as TIES masks and
elected signs bit for bit, floating results within stated tolerances).

Numerical conventions shared with the kernels:
- inputs are upcast to float32 (float64 stays float64); task vectors are τ_t = θ_t − base in that
  precision; sums over tasks run in task order t = 0, 1, …; no fused multiply-add;
- dot products (cosine, block_scale's coefficient gradient) accumulate in float64;
- outputs come back in the input dtype.
"""

from __future__ import annotations

import torch

from . import _validate as V


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scalar(v: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(v, dtype=dtype)


def uniform_average(thetas, weights=None) -> torch.Tensor:
    """Σ_t w_t θ_t / Σ_t w_t (w_t = 1 when weights is None)."""
    ths = V.as_task_list(thetas)
    V.check_tasks(ths, "thetas")
    T = len(ths)
    w = V.per_task_floats(1.0 if weights is None else weights, T, "weights", nonneg=True)
    V.raise_if_nonfinite([(f"thetas[{t}]", x) for t, x in enumerate(ths)])
    acc_t = _acc_dtype(ths[0].dtype)
    acc = ths[0].to(acc_t) * _scalar(w[0], acc_t)
    total = _scalar(w[0], acc_t)
    for t in range(1, T):
        acc = acc + ths[t].to(acc_t) * _scalar(w[t], acc_t)
        total = total + _scalar(w[t], acc_t)
    if not float(total) > 0:
        raise ValueError("weights sum to zero")
    return (acc / total).to(ths[0].dtype)


def task_arithmetic(base: torch.Tensor, thetas, lam=1.0) -> torch.Tensor:
    """base + Σ_t λ_t (θ_t − base)."""
    b = V._flat_view(base)
    ths = V.as_task_list(thetas)
    V.check_tasks(ths, "thetas", like=b)
    lams = V.per_task_floats(lam, len(ths), "lam")
    V.raise_if_nonfinite([("base", b)] + [(f"thetas[{t}]", x) for t, x in enumerate(ths)])
    acc_t = _acc_dtype(b.dtype)
    b32 = b.to(acc_t)
    acc = b32
    for t, x in enumerate(ths):
        acc = acc + _scalar(lams[t], acc_t) * (x.to(acc_t) - b32)
    return acc.to(b.dtype).view(base.shape)


def ties_segments(numel: int, scope: str, layout) -> list[tuple[int, int]]:
    if scope == "global":
        return [(0, numel)]
    if layout is None:
        raise ValueError('scope="tensor" needs layout= (a FlatLayout or block offsets)')
    off = V.check_offsets(layout, numel, name="layout").tolist()
    return [(off[i], off[i + 1]) for i in range(len(off) - 1)]


def ties_masks(tau: torch.Tensor, density: float, segments) -> torch.Tensor:
    """Trim masks of the stacked task vectors [T, d]: keep |τ| >= the k-th smallest |τ| per row and segment."""
    mask = torch.empty(tau.shape, dtype=torch.bool, device=tau.device)
    for a, b in segments:
        n = b - a
        if n == 0:
            continue
        k = V.ties_k(n, density)
        seg = tau[:, a:b].abs()
        if k == 0:
            mask[:, a:b] = True
        else:
            thr = seg.kthvalue(k, dim=1, keepdim=True).values
            mask[:, a:b] = seg >= thr
    return mask


def ties_elect(trimmed: torch.Tensor) -> torch.Tensor:
    """Elected sign γ per entry: sign of the task-order sum, zeros replaced by the majority sign."""
    s = torch.zeros_like(trimmed[0])
    for t in range(trimmed.shape[0]):
        s = s + trimmed[t]
    gamma = torch.sign(s)
    majority = torch.sign(gamma.to(torch.int64).sum()).to(gamma.dtype)
    return torch.where(gamma == 0, majority, gamma)


def merge_ties(base, thetas, density=0.2, lam=1.0, merge="mean", scope="global", layout=None,
               weights=None, *, return_parts: bool = False):
    """TIES-Merging: trim, elect sign, disjoint merge; base + λ·τ_merged.

    With ``return_parts=True`` also returns a dict with the trim ``mask`` [T, d] (bool) and the
    elected sign ``gamma`` [d] (float), for exactness tests.
    """
    b = V._flat_view(base)
    ths = V.as_task_list(thetas)
    V.check_tasks(ths, "thetas", like=b)
    T = len(ths)
    density = V.check_density(density)
    V.check_merge(merge)
    V.check_scope(scope)
    lam_f = float(V.per_task_floats(lam, 1, "lam")[0])
    w = None if weights is None else V.per_task_floats(weights, T, "weights", positive=True)
    segments = ties_segments(b.numel(), scope, layout)
    V.raise_if_nonfinite([("base", b)] + [(f"thetas[{t}]", x) for t, x in enumerate(ths)])

    acc_t = _acc_dtype(b.dtype)
    b32 = b.to(acc_t)
    tau = torch.stack([x.to(acc_t) - b32 for x in ths])  # [T, d]: the published code's layout
    if w is not None:
        tau = tau * torch.tensor(w, dtype=acc_t, device=tau.device)[:, None]
    mask = ties_masks(tau, density, segments)
    trimmed = torch.where(mask, tau, torch.zeros((), dtype=acc_t))
    gamma = ties_elect(trimmed)
    selected = trimmed * gamma > 0  # same nonzero sign as the elected one
    zero = torch.zeros((), dtype=acc_t)
    if merge == "max":
        mx = torch.zeros_like(b32)
        for t in range(T):
            mx = torch.maximum(mx, torch.where(selected[t], trimmed[t].abs(), zero))
        merged = mx * gamma
    else:
        acc = torch.zeros_like(b32)
        cnt = torch.zeros_like(b32)
        for t in range(T):
            acc = acc + torch.where(selected[t], trimmed[t], zero)
            cnt = cnt + selected[t].to(acc_t)
        merged = acc / cnt.clamp(min=1) if merge == "mean" else acc
    out = (b32 + _scalar(lam_f, acc_t) * merged).to(b.dtype).view(base.shape)
    if return_parts:
        return out, {"mask": mask, "gamma": gamma}
    return out


def task_vector_cosine(base, thetas, gram: bool = False) -> torch.Tensor:
    """T×T cosine matrix (or Gram matrix of dot products) of τ_t = θ_t − base, in float64.

    A zero task vector has cosine 0 with every vector, itself included.
    """
    b = V._flat_view(base)
    ths = V.as_task_list(thetas)
    V.check_tasks(ths, "thetas", like=b)
    V.raise_if_nonfinite([("base", b)] + [(f"thetas[{t}]", x) for t, x in enumerate(ths)])
    acc_t = _acc_dtype(b.dtype)
    b32 = b.to(acc_t)
    tau = torch.stack([(x.to(acc_t) - b32).double() for x in ths])
    G = tau @ tau.T
    if gram:
        return G
    return gram_to_cosine(G)


def gram_to_cosine(G: torch.Tensor) -> torch.Tensor:
    """Cosine matrix from a Gram matrix; zero-norm rows and columns give 0, never NaN."""
    norms = G.diagonal().clamp(min=0).sqrt()
    denom = norms[:, None] * norms[None, :]
    C = torch.where(denom > 0, G / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(G))
    C = C.clamp(-1.0, 1.0)
    diag = torch.where(norms > 0, torch.ones_like(norms), torch.zeros_like(norms))
    C.diagonal().copy_(diag)
    return C


def block_ids(offsets: torch.Tensor) -> torch.Tensor:
    sizes = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(sizes.numel()), sizes)


def block_scale(base, vectors, coefs, blocks=None) -> torch.Tensor:
    """base + Σ_t coefs[t, b(i)] · vectors[t][i] (differentiable through autograd)."""
    b = V._flat_view(base)
    vs = V.as_task_list(vectors, "vectors")
    V.check_tasks(vs, "vectors", like=b)
    off = V.check_offsets([0, b.numel()] if blocks is None else blocks, b.numel())
    V.check_coefs(coefs, len(vs), off.numel() - 1, b)
    V.raise_if_nonfinite([("base", b), ("coefs", coefs)] + [(f"vectors[{t}]", x) for t, x in enumerate(vs)])
    acc_t = _acc_dtype(b.dtype)
    ids = block_ids(off).to(b.device)
    out = b.to(acc_t)
    for t, v in enumerate(vs):
        out = out + coefs[t].to(acc_t)[ids] * v.to(acc_t)
    return out.to(b.dtype).view(base.shape)


def block_scale_backward(grad, vectors, coefs, blocks=None):
    """Gradients of block_scale: (∂L/∂base, ∂L/∂coefs) with ∂L/∂coefs[t,b] = Σ_{i∈b} g_i v_{t,i} in float64."""
    g = V._flat_view(grad)
    vs = V.as_task_list(vectors, "vectors")
    off = V.check_offsets([0, g.numel()] if blocks is None else blocks, g.numel())
    ids = block_ids(off).to(g.device)
    B = off.numel() - 1
    gc = torch.zeros(len(vs), B, dtype=torch.float64, device=g.device)
    gd = g.double()
    for t, v in enumerate(vs):
        gc[t].index_add_(0, ids, gd * v.double())
    return g, gc.to(coefs.dtype)
