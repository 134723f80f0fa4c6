"""The merge methods of ``fastmerge merge``: their parameters, their input contracts and, per
tensor, their fast implementation.

Each method's formula lives in one place: the fast path here, its twin in
:mod:`fastmerge.merge.reference`. The formulas are mergekit 0.1.5's (see the module docstring of the
reference for the conventions). The fast paths:

- ``linear``, ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``breadcrumbs``,
  ``breadcrumbs_ties``: one fused C++ pass per tensor (``_C.ckpt_merge``) that forms the deltas,
  applies each model's keep rule (exact magnitude ranks from :mod:`fastmerge.merge.select`, or the
  counter-based random stream), weights, elects signs, and writes the output dtype. L1 rescaling adds one
  deterministic pass (``_C.ckpt_abs_sums``);
- ``della``, ``della_linear``: the per-row rank probabilities and keep draws in vectorised PyTorch
  (written apart from the twin's), then the fused pass;
- ``model_stock``: the Gram matrix of the task vectors (``fastmerge.task_vector_cosine``, float64)
  and one ``fastmerge.task_arithmetic`` pass (``filter_wise: true`` runs per row in PyTorch);
- ``slerp`` (over the whole flattened tensor, as mergekit 0.1.5): the pair's Gram matrix
  (``_C.gram``, float64) and one fused pass for c0 v0 + c1 v1;
- ``passthrough``: vectorised PyTorch.

On CUDA tensors (``--device cuda``) every method runs its PyTorch formulation on the GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from . import reference as R
from .select import merge_top_k, select_rules

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # float, bool or str
    scope: str  # "shared": one value per tensor; "input": per input model; "non_base": per non-base model
    default: Any = REQUIRED


@dataclass
class Job:
    """One output tensor's merge: the inputs (views of the checkpoints) and the resolved parameters."""

    name: str
    base: Optional[Tensor]  # None when the method takes no base
    inputs: List[Tensor]  # the non-base inputs (for linear / passthrough: every input)
    shared: Dict[str, Any]
    per: List[Dict[str, Any]]  # per input
    keys: List[int]  # random stream key per input
    out_dtype: torch.dtype
    fast: bool = True
    thresholds: Optional[List[int]] = None  # scope: global: each model's magnitude key threshold (keep >=)
    release: Optional[Callable[[int, int], None]] = None  # called with [a, b) when entries a..b-1 are merged
    sink: Optional[Callable[[Tensor, bool], None]] = None  # takes the output in flat pieces (then run returns None)
    buffer: Optional[Callable[[int, torch.dtype], Tensor]] = None  # where the pieces handed to sink come from
    resident: bool = False  # the inputs fit the memory budget: they stay mapped through every pass over them


@dataclass(frozen=True)
class Method:
    name: str
    params: Sequence[Param]
    run: Callable[[Job], Tensor]
    base: str = "required"  # "required", "optional" (linear, passthrough: the base is an input if listed)
    min_inputs: int = 1  # non-base inputs
    max_inputs: Optional[int] = None
    notes: str = ""
    gta: Dict[str, Any] = field(default_factory=dict)

    def param(self, name: str) -> Optional[Param]:
        return next((p for p in self.params if p.name == name), None)


def _C():
    from .._ops import _C as C

    if C is None:
        raise RuntimeError("the compiled extension fastmerge._C is missing; rebuild it with: "
                           "pip install --no-build-isolation -e .")
    return C


def _wide(x: Tensor) -> Tensor:
    """float32 for arithmetic, float64 kept."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _common(tensors: Sequence[Tensor]) -> List[Tensor]:
    """Flat contiguous views, converted to float32 only when the inputs' dtypes differ."""
    dts = {t.dtype for t in tensors}
    flat = [t.reshape(-1) for t in tensors]
    if len(dts) > 1:
        flat = [_wide(t) for t in flat]
    return [t if t.is_contiguous() else t.contiguous() for t in flat]


def _f32(x: float) -> float:
    return float(np.float32(x))


def _fused(job: Job, x: Tensor) -> bool:
    """Whether the fused C++ pass runs: CPU tensors, not float64 (the kernels compute in float32, so
    float64 checkpoints take the PyTorch formulation, which keeps float64)."""
    return job.fast and x.device.type == "cpu" and all(t.dtype != torch.float64 for t in [x] + list(job.inputs))


CHUNK = 1 << 22  # entries per fused call: a large tensor's input pages are released chunk by chunk


def _chunks(n: int):
    return [(a, min(n, a + CHUNK)) for a in range(0, max(n, 1), CHUNK)]


def _piece(job: Job, n: int) -> Tensor:
    """A flat output buffer of ``n`` entries for a piece that goes to ``job.sink``: the sink's own (reused)
    buffers where it lends them, since fresh pages cost more to fault in than the merge costs to write."""
    if job.sink is not None and job.buffer is not None:
        return job.buffer(n, job.out_dtype)
    return torch.empty(n, dtype=job.out_dtype)


def _fused_merge(C, job: Job, base: Optional[Tensor], thetas: List[Tensor], weights, rules, streams, probs, scale,
                 code: int, normalize: bool, lam: float, guard: bool, shape) -> Optional[Tensor]:
    """``_C.ckpt_merge`` over the tensor in chunks; the inputs' pages of each merged chunk are handed to
    ``job.release``. The output goes piece by piece to ``job.sink`` (returns None), else into one tensor."""
    n = thetas[0].numel()
    out = None if job.sink is not None else torch.empty(n, dtype=job.out_dtype)
    for a, b in _chunks(n):
        piece = out[a:b] if out is not None else _piece(job, b - a)
        C.ckpt_merge(None if base is None else base[a:b], [t[a:b] for t in thetas], weights, rules, streams, probs,
                     scale, code, normalize, lam, guard, job.out_dtype, a, piece)
        if job.release is not None:
            job.release(a, b)
        if job.sink is not None:
            job.sink(piece, b == n)
    return None if out is None else out.view(shape)


# ---------------------------------------------------------------------- generalised task arithmetic

def _ranks(method: str, p: dict, n: int):
    """Kept ranks [lo, hi) in ascending |delta| order, and whether ties are ordered by high index."""
    d = float(p["density"])
    if d >= 1:
        return 0, n, False
    if method == "magnitude":  # mergekit: argsort(|delta|, descending)[:k]
        k = max(1, int(d * n))
        return n - k, n, True
    target = int(d * n)  # outliers: sort(|delta|)[n_bot : n_bot + target]
    n_top = int(float(p["gamma"]) * n)
    n_bot = max(0, n - target - n_top)
    return n_bot, n_bot + target, False


def della_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MagPrune keep probabilities (float32, flat in ``delta``'s order). The ranking runs along
    dim 1, as mergekit's does (a matrix: within each row; a 1-D tensor is one row): the entry of rank r in
    ascending |delta| (0-based, equal magnitudes ordered by index) among m is kept with probability
    (density - epsilon) + 2 epsilon r / (m - 1); m = 1 has no rank spread (0 / 0: never kept, where
    mergekit's formula gives NaN)."""
    x = delta.reshape(1, -1) if delta.dim() < 2 else delta
    m = x.shape[1]
    mags = x.abs().float().movedim(1, -1)  # the ranked axis last, contiguous below
    pos = torch.sort(mags.contiguous(), dim=-1, stable=True).indices  # pos[..., r]: the index of rank r
    rank = torch.empty_like(pos)
    rank.scatter_(-1, pos, torch.arange(m, dtype=pos.dtype).expand_as(pos).contiguous())
    frac = rank.float() / float(m - 1) if m > 1 else torch.full(mags.shape, float("nan"))
    lo = torch.tensor(density - epsilon, dtype=torch.float32)
    step = torch.tensor(epsilon, dtype=torch.float32) * 2
    return (lo + frac * step).movedim(-1, 1).reshape(-1)


def _della_keep(C, delta: Tensor, density: float, epsilon: float, key: int) -> Tensor:
    """Entry i is kept when its 24 random bits (the compiled stream) fall below p_i * 2^24."""
    p = della_probabilities(delta, density, epsilon).double() * float(1 << 24)
    bits = C.ckpt_random_bits(key, 0, delta.numel())
    return (bits.double() < p).reshape(-1)


def _l1_rescaled(delta: Tensor, kept: Tensor) -> Tensor:
    """``kept`` scaled by |delta|_1 / |kept|_1 (sums in float64), unless either sum is below 1e-7."""
    before = float(delta.abs().sum(dtype=torch.float64))
    after = float(kept.abs().sum(dtype=torch.float64))
    if _f32(before) < 1e-7 or _f32(after) < 1e-7:
        return kept
    return kept * _f32(np.float32(before) / np.float32(after))


def _gta_fast(job: Job, sparsification: Optional[str], consensus: Optional[str], default_normalize: bool,
              default_rescale: bool) -> Tensor:
    C = _C()
    shape = job.base.shape
    flat = _common([job.base] + job.inputs)
    base, thetas = flat[0], flat[1:]
    n, T = base.numel(), len(thetas)
    row = int(shape[-1]) if len(shape) >= 2 else 0  # the sampled brackets are stratified by row
    rescale = bool(job.shared.get("rescale", default_rescale))
    sparse = [sparsification is not None and float(p.get("density", 1.0)) < 1 for p in job.per]
    rules = streams = top_k = None
    probs = [1.0] * T
    if sparsification == "della" and any(sparse):
        # the per-row rank probabilities and the keep draws here (vectorised, not the twin's code); the
        # masked, rescaled deltas then enter the fused pass
        b = _wide(base)
        masked = []
        for th, p, k, sp in zip(thetas, job.per, job.keys, sparse):
            if not sp:
                masked.append(th)
                continue
            d = _wide(th) - b
            keep = _della_keep(C, d.reshape(shape), float(p["density"]), float(p["epsilon"]), k)
            kept = torch.where(keep, d, torch.zeros_like(d))
            masked.append(b + (_l1_rescaled(d, kept) if rescale else kept))
        flat = _common([b] + masked)
        base, thetas = flat[0], flat[1:]
        sparse = [False] * T
    elif job.thresholds is not None:  # scope: global: keep |delta| >= the model's own threshold, ties included
        rules = torch.tensor([[k, 0, n - 1, 1 << 32, 0, n - 1] for k in job.thresholds], dtype=torch.int64)
    elif sparsification in ("magnitude", "outliers") and any(sparse):
        lo, hi, hi_idx = zip(*(_ranks(sparsification, p, n) for p in job.per))
        if sparsification == "magnitude" and not rescale and n <= CHUNK:
            top_k = (lo, hi, hi_idx)  # merged with the selection below
        else:
            rules = select_rules(C, base, thetas, lo, hi, hi_idx, _chunks(n), job.release, row,
                                 resident=True if job.resident else None)  # None: resident when one chunk
    elif sparsification == "random" and any(sparse):
        streams = torch.tensor(job.keys, dtype=torch.int64)
        probs = [float(p["density"]) if sp else 1.0 for p, sp in zip(job.per, sparse)]
    scale = [1.0] * T
    if rescale and (rules is not None or streams is not None):
        sums = 0
        for a, b in _chunks(n):
            sums = sums + C.ckpt_abs_sums(base[a:b], [t[a:b] for t in thetas], rules, streams, probs, a)
            if job.release is not None and not job.resident and n > CHUNK:
                job.release(a, b)  # over the budget: the pages leave chunk by chunk (read again from the cache)
        sums = sums.tolist()
        for t, (before, after) in enumerate(sums):
            before, after = _f32(before), _f32(after)
            if sparse[t] and before >= 1e-7 and after >= 1e-7:
                scale[t] = _f32(np.float32(before) / np.float32(after))
    weights = [float(p["weight"]) for p in job.per]
    normalize = bool(job.shared.get("normalize", default_normalize))
    code = {None: 0, "sum": 1, "count": 2}[consensus]
    lam = float(job.shared.get("lambda", 1.0))
    if top_k is not None:  # one chunk, no rescaling: the exact selection rides on the merge pass
        out = _piece(job, n)
        if merge_top_k(C, base, thetas, top_k[0], top_k[2], weights,
                       (None, probs, scale, code, normalize, lam, True, job.out_dtype), out, row):
            if job.release is not None:
                job.release(0, n)
            if job.sink is not None:
                job.sink(out, True)
                return None
            return out.view(shape)
        rules = select_rules(C, base, thetas, *top_k, _chunks(n), job.release, row)
    return _fused_merge(C, job, base, thetas, weights, rules, streams, probs, scale, code, normalize, lam, True,
                        shape)


def _gta_reference(job: Job, sparsification, consensus, default_normalize, default_rescale) -> Tensor:
    if job.thresholds is not None:
        sparsification = [("threshold", k) for k in job.thresholds]
    out = R.generalized_task_arithmetic(
        job.base, job.inputs, job.per, sparsification=sparsification, consensus=consensus,
        normalize=bool(job.shared.get("normalize", default_normalize)),
        rescale=bool(job.shared.get("rescale", default_rescale)), lam=float(job.shared.get("lambda", 1.0)),
        keys=job.keys)
    return out.to(job.out_dtype)


def _gta_method(name: str, sparsification: Optional[str], consensus: Optional[str], normalize: bool, rescale: bool,
                notes: str) -> Method:
    params = [Param("int8_mask", bool, "shared", False), Param("normalize", bool, "shared", normalize),
              Param("rescale", bool, "shared", rescale), Param("lambda", float, "shared", 1.0),
              Param("weight", float, "non_base"), Param("density", float, "non_base", 1.0)]
    if sparsification == "outliers":
        params.append(Param("gamma", float, "non_base", 0.01))
    if name == "ties":
        params.append(Param("scope", str, "shared", "tensor"))
    if sparsification == "della":
        params.append(Param("epsilon", float, "non_base", 0.15))

    def run(job: Job) -> Tensor:
        f = _gta_fast if _fused(job, job.base) else _gta_reference
        return f(job, sparsification, consensus, normalize, rescale)

    return Method(name, tuple(params), run, notes=notes, gta=dict(sparsification=sparsification, consensus=consensus))


# ---------------------------------------------------------------------- the others

def _linear(job: Job) -> Tensor:
    ws = [float(p["weight"]) for p in job.per]
    normalize = bool(job.shared.get("normalize", True))
    if _fused(job, job.inputs[0]):
        flat = _common(job.inputs)
        T = len(flat)
        return _fused_merge(_C(), job, None, flat, ws, None, None, [1.0] * T, [1.0] * T, 0, normalize, 1.0, False,
                            job.inputs[0].shape)
    return R.linear(job.inputs, ws, normalize).to(job.out_dtype)


def slerp_coefficients(t: float, gram: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8):
    """(c0, c1) with slerp(v0, v1) = c0 v0 + c1 v1, from the float64 Gram matrix of (v0, v1): the angle of
    the normalised pair (a norm at or below eps counts as 1); linear, (1 - t, t), where |cos| exceeds
    dot_threshold."""
    n0, n1 = math.sqrt(float(gram[0, 0])), math.sqrt(float(gram[1, 1]))
    n0, n1 = (n0 if n0 > eps else 1.0), (n1 if n1 > eps else 1.0)
    cos = min(1.0, max(-1.0, float(gram[0, 1]) / (n0 * n1)))
    if abs(cos) > dot_threshold:
        return 1.0 - t, t
    angle = math.acos(cos)
    return math.sin((1.0 - t) * angle) / math.sin(angle), math.sin(t * angle) / math.sin(angle)


def _slerp(job: Job) -> Tensor:
    t = float(job.shared["t"])
    if not _fused(job, job.base):
        return R.slerp(t, job.base, job.inputs[0]).to(job.out_dtype)
    # two passes over the pair: their Gram matrix (float64 dot products, chunk by chunk; the pages stay
    # mapped), then c0 v0 + c1 v1 through the fused pass, which releases them
    C = _C()
    v0, v1 = _common([job.base, job.inputs[0]])
    n = v0.numel()
    zero = torch.zeros(min(n, CHUNK), dtype=v0.dtype)
    gram = torch.zeros(2, 2, dtype=torch.float64)
    for a, b in _chunks(n):
        if b > a:
            gram += C.gram(zero[:b - a], [v0[a:b], v1[a:b]])
    c0, c1 = slerp_coefficients(t, gram)
    return _fused_merge(C, job, None, [v0, v1], [c0, c1], None, None, [1.0, 1.0], [1.0, 1.0], 0, False, 1.0, False,
                        job.base.shape)


def _model_stock(job: Job) -> Tensor:
    filter_wise = bool(job.shared.get("filter_wise", False))
    if filter_wise or not job.fast or job.base.device.type != "cpu":
        return R.model_stock(job.base, job.inputs, filter_wise).to(job.out_dtype)
    import fastmerge

    flat = _common([job.base] + job.inputs)
    base, thetas = flat[0], flat[1:]
    G = fastmerge.task_vector_cosine(base, thetas, gram=True)  # float64 dot products
    n = len(thetas)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            norm = _f32(np.float32(np.sqrt(G[i, i].item())) * np.float32(np.sqrt(G[j, j].item())))
            cos.append(min(1.0, max(-1.0, G[i, j].item() / max(norm, 1e-6))))
    c = float(np.float32(sum(cos) / len(cos)))
    den = 1 + (n - 1) * c
    t = 0.0 if abs(den) < 1e-6 else n * c / den
    out = fastmerge.task_arithmetic(base, thetas, lam=t / n)
    return out.view(job.base.shape).to(job.out_dtype)


def _passthrough(job: Job) -> Tensor:
    scale = job.per[0].get("scale")
    x = job.inputs[0]
    return (x if scale is None else _wide(x) * float(scale)).to(job.out_dtype)


METHODS: Dict[str, Method] = {}


def _register(m: Method) -> None:
    METHODS[m.name] = m


_register(Method("linear", (Param("weight", float, "input"), Param("normalize", bool, "shared", True)), _linear,
                 base="optional", notes="sum w_t theta_t / sum w_t (one fused pass)"))
for _args in (
    ("task_arithmetic", None, None, False, False, "base + lambda sum w_t delta_t (one fused pass)"),
    ("ties", "magnitude", "sum", True, False, "top-k |delta| per tensor, sign election, disjoint mean (fused)"),
    ("dare_linear", "random", None, False, True, "random drop, L1 rescale (fused, counter-based RNG)"),
    ("dare_ties", "random", "sum", False, True, "random drop, L1 rescale, sign election (fused)"),
    ("breadcrumbs", "outliers", None, False, False, "drop the largest gamma and smallest |delta| (fused)"),
    ("breadcrumbs_ties", "outliers", "sum", False, False, "breadcrumbs + sign election (fused)"),
    ("della", "della", "sum", True, True, "rank-based random drop per row, sign election"),
    ("della_linear", "della", None, False, True, "rank-based random drop per row"),
):
    _register(_gta_method(*_args))
_register(Method("slerp", (Param("t", float, "shared"),), _slerp, min_inputs=1, max_inputs=1,
                 notes="spherical interpolation of each flattened tensor"))
_register(Method("model_stock", (Param("filter_wise", bool, "shared", False),), _model_stock, min_inputs=2,
                 notes="Gram of the task vectors (fused, float64) + one task-arithmetic pass"))
_register(Method("passthrough", (Param("scale", float, "input", None),), _passthrough, base="optional",
                 max_inputs=1, notes="copies one input (optionally scaled)"))


def reference_run(method: Method, job: Job) -> Tensor:
    """The method's pure-PyTorch twin on the same job (for tests and verification; ignores ``sink``)."""
    if method.gta:
        g = method.gta
        return _gta_reference(job, g["sparsification"], g["consensus"], bool(method.param("normalize").default),
                              bool(method.param("rescale").default))
    if method.name == "linear":
        return R.linear(job.inputs, [float(p["weight"]) for p in job.per],
                        bool(job.shared.get("normalize", True))).to(job.out_dtype)
    if method.name == "model_stock":
        return R.model_stock(job.base, job.inputs, bool(job.shared.get("filter_wise", False))).to(job.out_dtype)
    if method.name == "slerp":
        return R.slerp(float(job.shared["t"]), job.base, job.inputs[0]).to(job.out_dtype)
    if method.name == "passthrough":
        return R.passthrough(job.inputs[0], job.per[0].get("scale")).to(job.out_dtype)
    return method.run(Job(**{**job.__dict__, "fast": False, "sink": None, "buffer": None}))
