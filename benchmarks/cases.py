"""Benchmark cases shared by ``fastmerge bench``, the memory probe and the pytest-benchmark suite.

- sizes: element counts, or the size of a real model layout (default: open_clip ViT-B-32's visual
  tower, d = 87,849,216), parsed from strings like ``1e5``, ``2M``, ``100000`` or ``vit``;
- the block structure (one block per parameter tensor) is derived from that model: at the model's
  own size it is the exact layout, at other sizes the same blocks scaled to the requested size;
- synthetic inputs: base ~ N(0, base_std), θ_t = base + noise_t with noise_t ~ N(0, σ_{t,b}) in
  each block b, σ_{t,b} = σ · 2^U(-1, 1) (a per-task, per-tensor scale), deterministic in ``seed``;
- the op table: how to call each op on a backend, its minimal memory traffic and its output size.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from typing import Any, Callable, Optional, Sequence

import torch

import fastmerge
from fastmerge import _ops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MODEL = "ViT-B-32"
MODEL_TOKENS = ("vit", "model")

# TIES settings of the benchmark (the common published defaults)
TIES_DENSITY = 0.2
TIES_LAM = 1.0
TA_LAM = 0.3


# ---------------------------------------------------------------------------------------- layout

@dataclasses.dataclass(frozen=True)
class ModelLayout:
    """Block structure of a model's parameters, as flat offsets (one block per tensor)."""

    name: str
    offsets: tuple[int, ...]

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    @property
    def num_tensors(self) -> int:
        return len(self.offsets) - 1

    def offsets_for(self, d: int) -> list[int]:
        """Block offsets for a buffer of ``d`` elements: the exact layout at the model's size,
        otherwise every boundary scaled by d / numel (so the same number of blocks, with the
        same relative sizes; at small d some blocks are empty)."""
        if d == self.numel:
            return list(self.offsets)
        n = self.numel
        out = [(o * d + n // 2) // n for o in self.offsets]
        out[0], out[-1] = 0, d
        return out


_LAYOUTS: dict[str, ModelLayout] = {}


def model_layout(name: str = DEFAULT_MODEL) -> ModelLayout:
    """Layout of the visual tower of the open_clip model ``name`` (built without weights)."""
    if name in _LAYOUTS:
        return _LAYOUTS[name]
    import open_clip

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "No pretrained weights loaded" is expected here
    try:
        try:  # no memory, no random init: only the shapes are needed
            with torch.device("meta"):
                model = open_clip.create_model(name, pretrained=None, device="meta")
        except Exception:
            model = open_clip.create_model(name, pretrained=None)
    finally:
        root.setLevel(level)
    module = getattr(model, "visual", model)
    flat = fastmerge.FlatLayout.from_module(module)
    layout = ModelLayout(f"open_clip {name} {'visual' if module is not model else 'model'}", tuple(flat.offsets))
    _LAYOUTS[name] = layout
    return layout


def layout_from_args(args) -> ModelLayout:
    """``--layout-json PATH`` (a JSON list of offsets) if given, else ``--model``'s visual tower."""
    path = getattr(args, "layout_json", None)
    if not path:
        return model_layout(args.model)
    import json

    with open(path) as f:
        offs = [int(o) for o in json.load(f)]
    if len(offs) < 2 or offs[0] != 0 or any(b < a for a, b in zip(offs, offs[1:])):
        raise SystemExit(f"--layout-json {path}: expected a non-decreasing list of offsets starting at 0")
    return ModelLayout(f"layout from {path}", tuple(offs))


# ---------------------------------------------------------------------------------------- sizes

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_count(text: str) -> int:
    """``100000``, ``1e5``, ``100k``, ``2.5M`` -> int."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgG]?)\s*", str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 100000, 1e5, 100k, 2.5M)")
    value = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if value < 1 or value != int(value):
        raise ValueError(f"size must be a positive whole number of elements, got {text!r}")
    return int(value)


def is_model_token(text: str) -> bool:
    return str(text).strip().lower() in MODEL_TOKENS


def size_label(d: int, model_numel: Optional[int] = None) -> str:
    if model_numel is not None and d == model_numel:
        return f"{d / 1e6:.1f}M*"
    for div, suf in ((10**9, "G"), (10**6, "M"), (10**3, "K")):
        if d >= div:
            v = d / div
            return f"{v:.0f}{suf}" if v == int(v) or v >= 100 else f"{v:.3g}{suf}"
    return str(d)


# ---------------------------------------------------------------------------------------- inputs

@dataclasses.dataclass
class Inputs:
    d: int
    T: int
    dtype: torch.dtype
    base: torch.Tensor
    thetas: list[torch.Tensor]
    offsets: torch.Tensor  # int64 block offsets, one block per tensor of the layout
    coefs: torch.Tensor  # [T, B] float32
    grad: Optional[torch.Tensor]  # upstream gradient for the block_scale backward cases

    @property
    def elt(self) -> int:
        return self.base.element_size()

    @property
    def num_blocks(self) -> int:
        return self.offsets.numel() - 1

    def nbytes(self) -> int:
        n = self.base.nbytes + sum(t.nbytes for t in self.thetas)
        return n + (self.grad.nbytes if self.grad is not None else 0)


def make_inputs(d: int, T: int, dtype: torch.dtype, offsets: Sequence[int], *, seed: int = 0,
                sigma: float = 1e-3, base_std: float = 0.02, with_grad: bool = False) -> Inputs:
    """Deterministic synthetic base + T fine-tuned vectors (see the module docstring)."""
    offs = [int(o) for o in offsets]
    if offs[0] != 0 or offs[-1] != d:
        raise ValueError("offsets must run from 0 to d")
    g = torch.Generator().manual_seed(seed)
    nb = len(offs) - 1
    base = torch.empty(d, dtype=torch.float32).normal_(0.0, base_std, generator=g)
    scales = (sigma * torch.exp2(torch.empty(T, nb, dtype=torch.float64).uniform_(-1.0, 1.0, generator=g))).tolist()
    thetas = []
    for t in range(T):
        x = torch.empty(d, dtype=torch.float32).normal_(0.0, 1.0, generator=g)
        for b in range(nb):
            if offs[b + 1] > offs[b]:
                x[offs[b]:offs[b + 1]].mul_(scales[t][b])
        x.add_(base)
        thetas.append(x if dtype == torch.float32 else x.to(dtype))
        del x
    coefs = (0.3 + 0.05 * torch.randn(T, nb, generator=g)).to(torch.float32)
    grad = None
    if with_grad:
        grad = torch.empty(d, dtype=torch.float32).normal_(0.0, 1.0, generator=g)
        if dtype != torch.float32:
            grad = grad.to(dtype)
    if dtype != torch.float32:
        base = base.to(dtype)
    return Inputs(d, T, dtype, base, thetas, torch.tensor(offs, dtype=torch.int64), coefs, grad)


def _raw(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy())


def dump_inputs(x: Inputs, path: str) -> None:
    """Write the inputs as raw bytes (base, thetas, coefs, grad), for :func:`load_inputs`."""
    with open(path, "wb") as f:
        for t in [x.base, *x.thetas, x.coefs] + ([x.grad] if x.grad is not None else []):
            f.write(_raw(t))


def load_inputs(path: str, d: int, T: int, dtype: torch.dtype, offsets: Sequence[int], *,
                with_grad: bool = False) -> Inputs:
    """Read inputs written by :func:`dump_inputs` into fresh (anonymous) tensors: the same bits as
    regenerating them with :func:`make_inputs`, much faster than the random number generator."""
    offs = [int(o) for o in offsets]
    nb = len(offs) - 1

    def read(f, n, dt):
        t = torch.empty(n, dtype=dt)
        view = _raw(t)
        got = f.readinto(view)
        if got != len(view):
            raise ValueError(f"{path}: truncated input file")
        return t

    with open(path, "rb") as f:
        base = read(f, d, dtype)
        thetas = [read(f, d, dtype) for _ in range(T)]
        coefs = read(f, T * nb, torch.float32).view(T, nb)
        grad = read(f, d, dtype) if with_grad else None
    return Inputs(d, T, dtype, base, thetas, torch.tensor(offs, dtype=torch.int64), coefs, grad)


# ---------------------------------------------------------------------------------------- ops

@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    title: str
    # minimal memory traffic in bytes: every input read once, the output written once
    min_bytes: Callable[[int, int, int], int]  # (T, d, elt) -> bytes
    out_bytes: Callable[[int, int, int, int], int]  # (T, d, B, elt) -> bytes of the result
    bind: Callable[[Inputs, str], Callable[[], Any]]
    needs_grad: bool = False
    phases: bool = False  # the bound call returns {"forward": s, "backward": s}
    is_ties: bool = False


def _avg(x: Inputs, be: str):
    return lambda: fastmerge.uniform_average(x.thetas, backend=be)


def _ta(x: Inputs, be: str):
    return lambda: fastmerge.task_arithmetic(x.base, x.thetas, TA_LAM, backend=be)


def _ties(x: Inputs, be: str):
    return lambda: fastmerge.merge_ties(x.base, x.thetas, density=TIES_DENSITY, lam=TIES_LAM, merge="mean",
                                        scope="global", backend=be)


def _ties_tensor(x: Inputs, be: str):
    return lambda: fastmerge.merge_ties(x.base, x.thetas, density=TIES_DENSITY, lam=TIES_LAM, merge="mean",
                                        scope="tensor", layout=x.offsets, backend=be)


def _cos(x: Inputs, be: str):
    return lambda: fastmerge.task_vector_cosine(x.base, x.thetas, backend=be)


def _bs(x: Inputs, be: str):
    return lambda: fastmerge.block_scale(x.base, x.thetas, x.coefs, blocks=x.offsets, backend=be)


def _bs_bwd(x: Inputs, be: str):
    return lambda: _ops.block_scale_backward_op(x.grad, x.thetas, x.coefs, x.offsets, be)


def _bs_fwd_bwd(x: Inputs, be: str):
    coefs = x.coefs.clone().requires_grad_(True)

    def run():
        coefs.grad = None
        t0 = time.perf_counter()
        y = fastmerge.block_scale(x.base, x.thetas, coefs, blocks=x.offsets, backend=be)
        t1 = time.perf_counter()
        y.backward(x.grad)
        t2 = time.perf_counter()
        del y
        return {"forward": t1 - t0, "backward": t2 - t1}

    return run


def _full(T, d, B, elt):
    return d * elt


OPS: dict[str, OpSpec] = {s.name: s for s in [
    OpSpec("uniform_average", "uniform average",
           lambda T, d, e: (T + 1) * d * e, _full, _avg),
    OpSpec("task_arithmetic", "task arithmetic",
           lambda T, d, e: (T + 2) * d * e, _full, _ta),
    OpSpec("merge_ties", "TIES global mean k=0.2",
           lambda T, d, e: (T + 2) * d * e, _full, _ties, is_ties=True),
    OpSpec("merge_ties_tensor", "TIES per-tensor mean k=0.2",
           lambda T, d, e: (T + 2) * d * e, _full, _ties_tensor, is_ties=True),
    OpSpec("task_vector_cosine", "task-vector cosine",
           lambda T, d, e: (T + 1) * d * e, lambda T, d, B, e: T * T * 8, _cos),
    OpSpec("block_scale", "block_scale forward",
           lambda T, d, e: (T + 2) * d * e, _full, _bs),
    OpSpec("block_scale_backward", "block_scale backward (coef grad)",
           lambda T, d, e: (T + 1) * d * e, lambda T, d, B, e: T * B * 8, _bs_bwd, needs_grad=True),
    OpSpec("block_scale_fwd_bwd", "block_scale fwd+bwd (autograd)",
           lambda T, d, e: (2 * T + 3) * d * e, lambda T, d, B, e: d * e + T * B * 4, _bs_fwd_bwd,
           needs_grad=True, phases=True),
]}

OP_NAMES = tuple(OPS)
