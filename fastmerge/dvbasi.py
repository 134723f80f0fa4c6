"""aTLAS and DV-BASI on the fused ``block_scale`` op.

Both learn per-block coefficients Λ of a block-scaled sum and nothing else:

- **aTLAS**: θ = θ_pre + Σ_t Λ_t τ_t with τ_t = θ_t − θ_pre (T task vectors, [T, B] coefficients).
- **DV-BASI** (Algorithm 1 of the paper): from θ_0 (a task-arithmetic, TIES or aTLAS merge, or one
  fine-tuned model in single-task mode), for m = 1..M: δ = θ_{m−1} − θ_pre; Λ starts at α; AdamW
  (lr 0.01) trains Λ for up to E epochs with early stopping (patience) on validation accuracy; the
  best epoch's Λ* gives θ_m = θ_{m−1} + Λ*·δ.

The model's parameters are views of the output of ``fastmerge.block_scale(base, vectors, Λ, blocks)``
(through ``torch.func.functional_call``), so a training step runs one fused merge forward and one
fused backward for ∂L/∂Λ, whatever the number of parameter tensors. Blocks are one per parameter
tensor by default, or one per row (``blocks="row"``), or one for everything (isotropic scaling).

Objectives: supervised cross-entropy summed over the tasks; unsupervised, on unlabeled training
images (or, with ``unlabeled_split="test"``, on the unlabeled test images: test-time adaptation as
in AdaMerging), either information maximisation (prediction entropy minus the entropy of the
batch's mean prediction, the default) or the paper's prediction entropy alone; MGDA (the min-norm
convex combination of the per-task gradients with respect to Λ, solved exactly); task negation
(ascent on a target task, descent on a control task, keeping at least 95 % of the starting model's
control accuracy). Model selection always uses
validation data; test accuracies are only reported.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

import fastmerge

from . import models
from .flat import FlatLayout

OBJECTIVES = ("supervised", "unsupervised", "mgda", "negation")
UNSUPERVISED_LOSSES = ("im", "entropy")
ABLATIONS = ("anisotropic", "isotropic", "random")


# ----------------------------------------------------------------------------- MGDA

def min_norm_weights(grads: torch.Tensor) -> torch.Tensor:
    """Exact min-norm point of the convex hull of T gradients (MGDA's common descent direction).

    Solves min_w ‖Σ_t w_t g_t‖² over the simplex (w ≥ 0, Σ w = 1) exactly: the minimum of a convex
    quadratic over the simplex is the minimum over the simplex's faces of the affine-constrained
    minimiser of each face, so every support set S is tried (KKT system of G_S = [g_i·g_j] with the
    constraint Σ w = 1, in float64), and the feasible solution with the smallest objective wins.
    That is 2^T − 1 tiny solves: fine for the T ≤ 16 that Λ-learning has.

    Args:
        grads: [T, n] per-task gradients (flattened).

    Returns:
        float64 weights [T] on the simplex.
    """
    g = grads.detach().double().flatten(1)
    T = g.shape[0]
    if T == 0:
        raise ValueError("min_norm_weights needs at least one gradient")
    if T > 16:
        raise ValueError(f"min_norm_weights solves exactly for T <= 16 tasks, got {T}")
    G = g @ g.t()
    scale = float(G.diagonal().max()) or 1.0
    Gs = G / scale
    best_w, best_val = None, float("inf")
    for k in range(1, T + 1):
        for S in itertools.combinations(range(T), k):
            idx = torch.tensor(S)
            A = torch.zeros(k + 1, k + 1, dtype=torch.float64)
            A[:k, :k] = Gs[idx][:, idx]
            A[:k, k] = 1.0
            A[k, :k] = 1.0
            rhs = torch.zeros(k + 1, dtype=torch.float64)
            rhs[k] = 1.0
            sol = torch.linalg.lstsq(A, rhs.unsqueeze(1)).solution.squeeze(1)
            wS = sol[:k]
            if (wS < -1e-12).any() or abs(float(wS.sum()) - 1.0) > 1e-9:
                continue
            w = torch.zeros(T, dtype=torch.float64)
            w[idx] = wS.clamp_min(0)
            w /= w.sum()
            val = float(w @ Gs @ w)
            if val < best_val - 1e-15:
                best_w, best_val = w, val
    return best_w


# ----------------------------------------------------------------------------- the merged model

class BlockScaledModel:
    """An encoder whose parameters are ``block_scale(base, vectors, coefs, blocks)``.

    ``coefs`` is the only trainable tensor. :meth:`logits` runs the fused merge forward, binds its
    output as the encoder's parameters with ``torch.func.functional_call`` and classifies;
    autograd brings ∂L/∂coefs back through one fused backward.
    """

    def __init__(self, encoder: torch.nn.Module, layout: FlatLayout, base: torch.Tensor,
                 vectors: Sequence[torch.Tensor], blocks, init: float = 0.0):
        if base.numel() != layout.numel:
            raise ValueError(f"base has {base.numel()} elements, the encoder's layout {layout.numel}")
        for i, v in enumerate(vectors):
            if v.shape != base.shape:
                raise ValueError(f"vectors[{i}] has shape {tuple(v.shape)}, base {tuple(base.shape)}: "
                                 "the models have different layouts")
        self.encoder, self.layout, self.base, self.vectors = encoder, layout, base, list(vectors)
        self.offsets = fastmerge.FlatLayout.check_blocks(blocks, base.numel())
        self.coefs = torch.full((len(self.vectors), self.offsets.numel() - 1), float(init),
                                dtype=torch.float32, requires_grad=True)
        for p in encoder.parameters():
            p.requires_grad_(False)

    def merged(self) -> torch.Tensor:
        return fastmerge.block_scale(self.base, self.vectors, self.coefs, self.offsets)

    def logits(self, merged: torch.Tensor, head: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        params = self.layout.unflatten(merged)
        feats = torch.func.functional_call(self.encoder, params, (images,))
        return F.normalize(feats, dim=-1) @ head.t()


def resolve_blocks(layout: FlatLayout, blocks) -> torch.Tensor:
    """``"tensor"`` (one block per parameter tensor), ``"row"``, ``"global"`` or explicit offsets."""
    if isinstance(blocks, str):
        return layout.block_offsets(blocks)
    return FlatLayout.check_blocks(blocks, layout.numel)


# ----------------------------------------------------------------------------- coefficient learning

@dataclass
class CoefConfig:
    """How Λ is learned (one outer iteration of DV-BASI, or aTLAS)."""

    objective: str = "supervised"
    lr: float = 0.01
    weight_decay: float = 0.0
    epochs: int = 20
    patience: int = 3
    steps_per_epoch: int = 10
    batch_size: int = 64
    init: float = 0.1
    val_limit: Optional[int] = None
    test_limit: Optional[int] = None
    negation_keep: float = 0.95
    # images the unsupervised objective sees: "train", or "test" for test-time adaptation on the
    # unlabeled test images (AdaMerging's protocol, which the paper's unsupervised results follow);
    # labels are never read, and model selection still uses the validation split
    unlabeled_split: str = "train"
    # the unsupervised loss: "im" (information maximisation: mean prediction entropy minus the
    # entropy of the batch's mean prediction, so the merged model cannot lower it by sending every
    # image to one class) or "entropy" (prediction entropy alone, the paper's surrogate)
    unsupervised_loss: str = "im"
    seed: int = 0


@dataclass
class Objective:
    """Which tasks train and how: ``tasks`` index the suite; ``target``/``control`` for negation."""

    kind: str
    tasks: Sequence[int]
    target: Optional[int] = None
    control: Optional[int] = None

    def __post_init__(self):
        if self.kind not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.kind!r}")
        if self.kind == "negation" and (self.target is None or self.control is None or self.target == self.control):
            raise ValueError("negation needs a target task and a different control task")
        if self.kind != "negation" and not self.tasks:
            raise ValueError("the objective needs at least one task")


def _batch_iters(suite, obj: Objective, cfg: CoefConfig, epoch: int):
    tasks = [obj.target, obj.control] if obj.kind == "negation" else list(obj.tasks)
    out = {}
    split = cfg.unlabeled_split if obj.kind == "unsupervised" else "train"
    if split not in ("train", "test"):
        raise ValueError(f"unlabeled_split must be train or test, got {split!r}")
    for t in tasks:
        g = torch.Generator().manual_seed((cfg.seed * 7919 + t * 104_729 + epoch) & 0x7FFFFFFF)
        out[t] = iter(suite.tasks[t].train_batches(cfg.batch_size, cfg.steps_per_epoch, g, split=split))
    return out


def check_unsupervised_loss(kind: str) -> None:
    """Raise ``ValueError`` unless ``kind`` is one of :data:`UNSUPERVISED_LOSSES`."""
    if kind not in UNSUPERVISED_LOSSES:
        raise ValueError(f"unsupervised_loss must be one of {UNSUPERVISED_LOSSES}, got {kind!r}")


def unsupervised_loss(logits: torch.Tensor, kind: str = "im") -> torch.Tensor:
    """The label-free loss of a batch of logits [N, C].

    ``"entropy"``: the mean prediction entropy, (1/N) Σ_i H(p_i), the paper's surrogate (after
    AdaMerging). Its minimum is reached by any confident prediction, including sending every image
    to one class.

    ``"im"``: information maximisation, (1/N) Σ_i H(p_i) − H(p̄) with p̄ = (1/N) Σ_i p_i, the mean
    prediction of the batch. The second term rewards spreading the batch over the classes, so the
    minimum (−log C for N ≥ C) needs confident *and* diverse predictions. That term assumes a
    random batch of a task covers its classes about evenly; on a strongly imbalanced split it
    pulls toward the wrong class mix.
    """
    check_unsupervised_loss(kind)
    logp = logits.float().log_softmax(-1)
    p = logp.exp()
    loss = -(p * logp).sum(-1).mean()
    if kind == "im":
        mean_p = p.mean(0)
        loss = loss + (mean_p * mean_p.clamp_min(1e-30).log()).sum()
    return loss


def _task_losses(model: BlockScaledModel, suite, obj: Objective, merged, batches,
                 unsup: str) -> dict[int, torch.Tensor]:
    losses = {}
    for t, it in batches.items():
        images, labels = next(it)
        logits = model.logits(merged, suite.heads[t], images)
        if obj.kind == "unsupervised":
            losses[t] = unsupervised_loss(logits, unsup)
        else:
            losses[t] = F.cross_entropy(logits, labels)
    return losses


def score(accs: dict, obj: Objective, floor: Optional[float]) -> float:
    """Selection score on validation accuracies: mean accuracy, or for negation the negated target
    accuracy when the control accuracy stays above its floor (else −inf)."""
    if obj.kind == "negation":
        if floor is not None and accs[obj.control] < floor:
            return float("-inf")
        return -accs[obj.target]
    return sum(accs[t] for t in obj.tasks) / len(obj.tasks)


def learn_coefs(model: BlockScaledModel, suite, ev, obj: Objective, cfg: CoefConfig,
                log: Callable[[str], None] = print, desc: str = "", progress: bool = True,
                floor: Optional[float] = None) -> dict:
    """Train ``model.coefs`` with AdamW and early stopping on validation; keep the best epoch.

    The candidate set includes the starting point with Λ = 0 (``base`` itself) as epoch 0, so the
    selected validation score never falls below the start's.

    Returns:
        A record with the chosen epoch, Λ*, and per-epoch validation (and test) accuracies.
    """
    check_unsupervised_loss(cfg.unsupervised_loss)
    eval_tasks = [obj.target, obj.control] if obj.kind == "negation" else list(obj.tasks)

    def evaluate(theta):
        val = {t: ev.accuracy(theta, t, "val", cfg.val_limit) for t in eval_tasks}
        test = {t: ev.accuracy(theta, t, "test", cfg.test_limit) for t in eval_tasks}
        return val, test

    val0, test0 = evaluate(model.base)
    best = dict(epoch=0, score=score(val0, obj, floor), coefs=torch.zeros_like(model.coefs))
    epochs = [dict(epoch=0, val=val0, test=test0, score=best["score"], loss=None)]
    opt = torch.optim.AdamW([model.coefs], lr=cfg.lr, weight_decay=cfg.weight_decay)
    bad = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs * cfg.steps_per_epoch, desc=desc or obj.kind, unit="step", file=sys.stderr,
                   dynamic_ncols=True, leave=False)
    try:
        for epoch in range(1, cfg.epochs + 1):
            batches = _batch_iters(suite, obj, cfg, epoch)
            total = 0.0
            for _ in range(cfg.steps_per_epoch):
                merged = model.merged()
                losses = _task_losses(model, suite, obj, merged, batches, cfg.unsupervised_loss)
                opt.zero_grad(set_to_none=True)
                if obj.kind == "mgda":
                    grads = [torch.autograd.grad(losses[t], model.coefs, retain_graph=(i + 1 < len(losses)))[0]
                             for i, t in enumerate(obj.tasks)]
                    w = min_norm_weights(torch.stack(grads)).to(model.coefs.dtype)
                    model.coefs.grad = sum(wi * g for wi, g in zip(w, grads))
                    loss = sum(float(wi) * losses[t].item() for wi, t in zip(w, obj.tasks))
                else:
                    if obj.kind == "negation":
                        loss_t = -losses[obj.target] + losses[obj.control]
                    else:
                        loss_t = sum(losses.values())
                    loss_t.backward()
                    loss = loss_t.item()
                opt.step()
                total += loss
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}", refresh=False)
            with torch.no_grad():
                theta = model.merged()
            val, test = evaluate(theta)
            s = score(val, obj, floor)
            epochs.append(dict(epoch=epoch, val=val, test=test, score=s, loss=total / cfg.steps_per_epoch))
            if s > best["score"]:
                best = dict(epoch=epoch, score=s, coefs=model.coefs.detach().clone())
                bad = 0
            else:
                bad += 1
                if bad >= cfg.patience:
                    break
    finally:
        if bar is not None:
            bar.close()
    return dict(best_epoch=best["epoch"], best_score=best["score"], coefs=best["coefs"], epochs=epochs)


# ----------------------------------------------------------------------------- aTLAS and DV-BASI

def atlas(suite, ev, theta_pre: torch.Tensor, thetas: Sequence[torch.Tensor], obj: Objective, cfg: CoefConfig,
          blocks="tensor", log: Callable[[str], None] = print, progress: bool = True):
    """aTLAS: learn [T, B] coefficients of θ_pre + Σ_t Λ_t τ_t. Returns (θ, record)."""
    taus = [th - theta_pre for th in thetas]
    model = BlockScaledModel(suite.encoder, suite.layout, theta_pre, taus, resolve_blocks(suite.layout, blocks),
                             init=cfg.init)
    rec = learn_coefs(model, suite, ev, obj, cfg, log, desc="aTLAS", progress=progress)
    with torch.no_grad():
        theta = fastmerge.block_scale(theta_pre, taus, rec["coefs"], model.offsets)
    return theta, rec


def dvbasi_step(suite, ev, theta_pre: torch.Tensor, theta_prev: torch.Tensor, obj: Objective, cfg: CoefConfig,
                blocks="tensor", ablation: str = "anisotropic", generator: Optional[torch.Generator] = None,
                log: Callable[[str], None] = print, progress: bool = True, desc: str = "DV-BASI",
                floor: Optional[float] = None):
    """One outer iteration: θ_m = θ_{m−1} + Λ*·δ with δ = θ_{m−1} − θ_pre. Returns (θ_m, record).

    ``ablation``: ``"anisotropic"`` (the method), ``"isotropic"`` (one scalar for the whole vector),
    or ``"random"`` (δ replaced by a random direction with the norm of δ, scaled per block).
    """
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    if theta_prev.shape != theta_pre.shape:
        raise ValueError(f"θ_pre has shape {tuple(theta_pre.shape)} but θ has {tuple(theta_prev.shape)}: "
                         "they must share one layout")
    delta = theta_prev - theta_pre
    if ablation == "random":
        r = torch.randn(delta.shape, generator=generator, dtype=torch.float32).to(delta.dtype)
        delta = r * (delta.double().norm() / r.double().norm().clamp_min(1e-30)).to(delta.dtype)
    offsets = (suite.layout.block_offsets("global") if ablation == "isotropic"
               else resolve_blocks(suite.layout, blocks))
    model = BlockScaledModel(suite.encoder, suite.layout, theta_prev, [delta], offsets, init=cfg.init)
    rec = learn_coefs(model, suite, ev, obj, cfg, log, desc=desc, progress=progress, floor=floor)
    with torch.no_grad():
        theta = fastmerge.block_scale(theta_prev, [delta], rec["coefs"], model.offsets)
    rec["delta_norm"] = float(delta.double().norm())
    return theta, rec


# ----------------------------------------------------------------------------- runs (CLI drivers)

INIT_MERGES = ("task_arithmetic", "ties", "atlas")


@dataclass
class DVBasiConfig:
    """A DV-BASI (or aTLAS-only) run on the built-in suite or the paper's datasets."""

    out: str = "runs/dvbasi"
    iterations: int = 3                        # M
    init_merge: str = "atlas"                  # θ_0: task_arithmetic, ties or atlas
    objective: str = "supervised"              # supervised, unsupervised or mgda
    alpha: float = 0.1                         # initial Λ of every DV-BASI iteration
    blocks: str = "tensor"                     # DV-BASI blocks: tensor (default), row or global
    ablations: Sequence[str] = ()              # extra runs: isotropic, random
    single_task: Optional[str] = None          # single-task mode: θ_0 = this task's fine-tuned model
    negate: Optional[str] = None               # task negation: target task
    control: Optional[str] = None              # task negation: control task
    atlas_only: bool = False
    task_models: Optional[str] = None          # folder of task-<name>.safetensors; None: fine-tune them
    coef: CoefConfig = field(default_factory=CoefConfig)
    atlas_init: float = 0.3
    atlas_objective: Optional[str] = None       # aTLAS objective for θ_0 (default: objective)
    atlas_blocks: Optional[str] = None          # aTLAS blocks for θ_0 (None: the same as blocks)
    # suite and fine-tuning (see fastmerge.mima.MimaConfig)
    model: Optional[str] = None
    pretrained: Optional[str] = None
    data_root: Optional[str] = None
    tasks: Optional[Sequence[str]] = None
    finetune_steps: Optional[int] = None
    seed: int = 0
    builtin_sizes: Optional[dict] = None
    progress: bool = True


def _mean(d: dict, keys) -> float:
    return sum(d[k] for k in keys) / len(keys)


def task_models(cfg: DVBasiConfig, suite, say) -> list[torch.Tensor]:
    """The fine-tuned task models: loaded from ``cfg.task_models``, else fine-tuned (MIMA with N = 1)."""
    from .mima import MimaConfig, run_mima

    names = [t.name for t in suite.tasks]
    folder = Path(cfg.task_models) if cfg.task_models else Path(cfg.out) / "task-models" / "N1" / "checkpoints"
    # result.json is written after the checkpoints, so its presence means fine-tuning finished.
    if cfg.task_models is None and not (folder.parent / "result.json").is_file():
        steps = cfg.finetune_steps or MimaConfig(data_root=cfg.data_root, iterations=(1,)).resolved().steps
        say(f"fine-tuning the {len(names)} task models first (independent fine-tuning, S = {steps} steps each) "
            f"into {folder.parent.parent}")
        run_mima(MimaConfig(iterations=(1,), model=cfg.model, pretrained=cfg.pretrained, data_root=cfg.data_root,
                            tasks=cfg.tasks, steps=cfg.finetune_steps, seed=cfg.seed, out=str(folder.parent.parent),
                            landscape=None, builtin_sizes=cfg.builtin_sizes, progress=cfg.progress),
                 resume=True, log=say)
    thetas = []
    for n in names:
        path = folder / f"task-{n}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"no task model for {n!r}: expected {path}")
        layout, flat = FlatLayout.load_safetensors(path)
        if layout != suite.layout:
            raise ValueError(f"{path} has another parameter layout than the {cfg.model or 'default'} encoder")
        thetas.append(flat)
    return thetas


def run_dvbasi(cfg: DVBasiConfig, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """θ_0 from a merge of the task models, then M DV-BASI iterations (and the asked ablations).

    Writes ``results.json``, ``report.md``, a Figure-2-style plot and every θ_m as safetensors to
    ``cfg.out``; with ``resume`` a killed run continues after its last finished outer iteration.
    """
    from .mima import TA_GRID, TIES_GRID, Evaluator, MimaConfig, _write_json, build_suite, pick_lambda

    if cfg.init_merge not in INIT_MERGES:
        raise ValueError(f"init_merge must be one of {INIT_MERGES}, got {cfg.init_merge!r}")
    if cfg.objective not in ("supervised", "unsupervised", "mgda"):
        raise ValueError("objective must be supervised, unsupervised or mgda (negation has its own option)")
    check_unsupervised_loss(cfg.coef.unsupervised_loss)
    for a in cfg.ablations:
        if a not in ("isotropic", "random"):
            raise ValueError(f"unknown ablation {a!r}: choose isotropic or random")
    if cfg.iterations < 1:
        raise ValueError("iterations (M) must be at least 1")
    if cfg.negate is not None and cfg.single_task is not None:
        raise ValueError("choose task negation or the single-task mode, not both")
    if cfg.control is not None and cfg.negate is None:
        raise ValueError("a control task only applies to task negation (--negate TARGET)")
    if cfg.negate is not None and cfg.objective != "supervised":
        raise ValueError("task negation has its own objective (ascent on the target, descent on the control); "
                         "leave the objective at supervised")
    if cfg.single_task is not None and cfg.objective == "mgda":
        raise ValueError("MGDA needs several tasks; the single-task mode has one")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_json = json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k != "progress"}, default=str))
    if (out / "config.json").is_file():
        old = json.loads((out / "config.json").read_text())
        if not resume:
            if (out / "results.json").is_file() or any(out.glob("*/theta-*.safetensors")):
                raise FileExistsError(f"{out} already holds a run; pass --resume or choose another --out")
        elif {k: v for k, v in old.items() if k != "out"} != {k: v for k, v in cfg_json.items() if k != "out"}:
            raise ValueError(f"--resume with different settings than the run in {out}")
    _write_json(cfg_json, out / "config.json")

    mcfg = MimaConfig(model=cfg.model, pretrained=cfg.pretrained, data_root=cfg.data_root, tasks=cfg.tasks,
                      steps=cfg.finetune_steps, seed=cfg.seed, builtin_sizes=cfg.builtin_sizes,
                      iterations=(1,), landscape=None).resolved()
    suite = build_suite(mcfg, log)
    names = [t.name for t in suite.tasks]
    ev = Evaluator(suite)
    thetas = task_models(cfg, suite, log)
    theta_pre = suite.theta0
    T = len(names)
    ft_test = [ev.accuracy(thetas[t], t, "test") for t in range(T)]
    pre_test = ev.all_tasks(theta_pre, "test")
    results: dict = dict(config=cfg_json, tasks=names, d=theta_pre.numel(), fine_tuned=ft_test, pretrained=pre_test)
    coef = cfg.coef

    def idx(name: str) -> int:
        if name not in names:
            raise ValueError(f"unknown task {name!r}; the suite has {names}")
        return names.index(name)

    def val_mean(theta) -> float:
        return sum(ev.accuracy(theta, t, "val") for t in eval_tasks) / len(eval_tasks)

    # ---- objective and θ_0
    if cfg.negate is not None:
        target, control = idx(cfg.negate), idx(cfg.control or next(n for n in names if n != cfg.negate))
        obj = Objective("negation", [target, control], target, control)
        floor = coef.negation_keep * ev.accuracy(theta_pre, control, "val")
        tau = thetas[target] - theta_pre
        make = lambda lam: theta_pre - lam * tau
        keep_ok = lambda th: (-ev.accuracy(th, target, "val") if ev.accuracy(th, control, "val") >= floor
                              else float("-inf"))
        lam, _ = pick_lambda(make, TA_GRID, keep_ok)
        theta0 = make(lam)
        results["init"] = dict(method="task_arithmetic_negation", lam=lam)
        eval_tasks = [target, control]
    elif cfg.single_task is not None:
        t = idx(cfg.single_task)
        obj = Objective(cfg.objective, [t])
        floor = None
        theta0 = thetas[t].clone()
        results["init"] = dict(method="fine_tuned", task=cfg.single_task)
        eval_tasks = [t]
    else:
        obj = Objective(cfg.objective, list(range(T)))
        floor = None
        eval_tasks = list(range(T))
        init_path = out / "theta-0.safetensors"
        if resume and init_path.is_file() and (out / "init.json").is_file():
            theta0 = FlatLayout.load_safetensors(init_path)[1]
            results["init"] = json.loads((out / "init.json").read_text())
        elif cfg.init_merge == "task_arithmetic":
            lam, _ = pick_lambda(lambda l: fastmerge.task_arithmetic(theta_pre, thetas, l), TA_GRID, val_mean)
            theta0 = fastmerge.task_arithmetic(theta_pre, thetas, lam)
            results["init"] = dict(method="task_arithmetic", lam=lam)
        elif cfg.init_merge == "ties":
            lam, _ = pick_lambda(lambda l: fastmerge.merge_ties(theta_pre, thetas, 0.2, l), TIES_GRID, val_mean)
            theta0 = fastmerge.merge_ties(theta_pre, thetas, 0.2, lam)
            results["init"] = dict(method="ties", lam=lam)
        else:
            acfg = CoefConfig(**{**asdict(coef), "init": cfg.atlas_init})
            aobj = Objective(cfg.atlas_objective or cfg.objective, list(range(T)))
            theta0, rec = atlas(suite, ev, theta_pre, thetas, aobj, acfg, cfg.atlas_blocks or cfg.blocks, log,
                                cfg.progress)
            results["init"] = dict(method="atlas", objective=aobj.kind, best_epoch=rec["best_epoch"],
                                   epochs=rec["epochs"])
        _write_json(results["init"], out / "init.json")   # first: resume needs both files
        tmp = init_path.with_name(init_path.name + f".tmp{os.getpid()}")
        suite.layout.save_safetensors(theta0, tmp, {"method": results["init"]["method"]})
        os.replace(tmp, init_path)

    def summary(theta):
        test = {t: ev.accuracy(theta, t, "test") for t in eval_tasks}
        val = {t: ev.accuracy(theta, t, "val") for t in eval_tasks}
        s = dict(test={names[t]: a for t, a in test.items()}, val={names[t]: a for t, a in val.items()},
                 abs=_mean(test, eval_tasks),
                 rel=100.0 * sum(test[t] / max(ft_test[t], 1e-9) for t in eval_tasks) / len(eval_tasks))
        return s

    if cfg.negate is not None or cfg.single_task is not None:
        suite.layout.save_safetensors(theta0, out / "theta-0.safetensors", {"method": results["init"]["method"]})
    results["theta0"] = summary(theta0)
    log(f"θ_0 ({results['init']['method']}): test accuracy {results['theta0']['abs']:.1f} % "
        f"(relative {results['theta0']['rel']:.1f} %)")
    if cfg.atlas_only:
        results["runs"] = {}
        return _finish(results, out, log)

    runs = {}
    for variant in ("anisotropic", *cfg.ablations):
        vdir = out / variant
        vdir.mkdir(exist_ok=True)
        state_path = vdir / "state.json"
        theta, its, start = theta0.clone(), [], 1
        if resume and state_path.is_file():
            st = json.loads(state_path.read_text())
            its, start = st["iterations"], st["done"] + 1
            theta = FlatLayout.load_safetensors(vdir / f"theta-{st['done']}.safetensors")[1]
            log(f"{variant}: resuming after outer iteration {st['done']} of {cfg.iterations}")
        gen = torch.Generator().manual_seed(cfg.seed + 17)
        if variant == "random":
            for _ in range(1, start):
                torch.randn(theta.shape, generator=gen)   # keep the random ablation's stream on resume
        for m in range(start, cfg.iterations + 1):
            t0 = time.perf_counter()
            theta, rec = dvbasi_step(suite, ev, theta_pre, theta, obj, coef_for(coef, cfg.alpha, m), cfg.blocks,
                                     variant, gen, log, cfg.progress, desc=f"{variant} m={m}", floor=floor)
            rec = dict(iteration=m, seconds=time.perf_counter() - t0, best_epoch=rec["best_epoch"],
                       delta_norm=rec["delta_norm"], epochs=rec["epochs"],
                       coef_range=[float(rec["coefs"].min()), float(rec["coefs"].max())], **summary(theta))
            its.append(rec)
            suite.layout.save_safetensors(theta, vdir / f"theta-{m}.safetensors", {"iteration": str(m)})
            _write_json(dict(done=m, iterations=its), state_path)
            log(f"{variant}, iteration {m}/{cfg.iterations}: best epoch {rec['best_epoch']}, test accuracy "
                f"{rec['abs']:.1f} % (relative {rec['rel']:.1f} %), {rec['seconds']:.0f} s")
        runs[variant] = its
    results["runs"] = runs
    results["negation"] = obj.kind == "negation"
    return _finish(results, out, log)


def coef_for(coef: CoefConfig, alpha: float, m: int) -> CoefConfig:
    return CoefConfig(**{**asdict(coef), "init": alpha, "seed": coef.seed * 1000 + m})


def _finish(results: dict, out: Path, log) -> dict:
    names = results["tasks"]
    lines = ["| model | test accuracy, abs. / rel. (%) |", "|---|---|"]
    pre = results["pretrained"]
    t0 = results["theta0"]
    keys = list(t0["test"])
    lines.append(f"| pretrained | {sum(pre[names.index(k)] for k in keys) / len(keys):.1f} / – |")
    lines.append(f"| fine-tuned | {sum(results['fine_tuned'][names.index(k)] for k in keys) / len(keys):.1f} / 100 |")
    lines.append(f"| θ_0 ({results['init']['method']}) | {t0['abs']:.1f} / {t0['rel']:.1f} |")
    for variant, its in results.get("runs", {}).items():
        for it in its:
            lines.append(f"| DV-BASI {variant}, m = {it['iteration']} | {it['abs']:.1f} / {it['rel']:.1f} |")
    if results.get("negation"):
        tgt, ctl = keys
        lines += ["", "Task negation (test accuracy, %):", "", f"| model | target {tgt} (↓) | control {ctl} (↑) |",
                  "|---|---|---|",
                  f"| pretrained | {pre[names.index(tgt)]:.1f} | {pre[names.index(ctl)]:.1f} |",
                  f"| task arithmetic (λ {results['init']['lam']:g}) | {t0['test'][tgt]:.1f} | {t0['test'][ctl]:.1f} |"]
        for variant, its in results["runs"].items():
            it = its[-1]
            lines.append(f"| + DV-BASI {variant} (M = {it['iteration']}) | {it['test'][tgt]:.1f} | {it['test'][ctl]:.1f} |")
    table = "\n".join(lines)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    files = []
    try:
        files = _plot(results, out)
    except ImportError:
        log("matplotlib is not installed: no plots")
    (out / "report.md").write_text("# DV-BASI results\n\n" + table + "\n\n" + "\n".join(f"![{f.stem}]({f.name})" for f in files) + "\n")
    log("")
    log(table)
    log(f"\nresults: {out / 'results.json'}, report: {out / 'report.md'}")
    return results


def _plot(results: dict, out: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results.get("runs", {})
    if not runs:
        return []
    ft = results["fine_tuned"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for variant, its in runs.items():
        x = 0
        for it in its:
            rel = [100.0 * sum(a / max(ft[int(t)], 1e-9) for t, a in ep["test"].items()) / len(ep["test"])
                   for ep in it["epochs"]]
            xs = list(range(x, x + len(rel)))
            ax.plot(xs, rel, marker="o", ms=3, label=f"{variant} m={it['iteration']}")
            x = xs[-1] + 1
    ax.set_xlabel("epoch (all outer iterations in turn)")
    ax.set_ylabel("relative test accuracy (%)")
    ax.set_title("stepwise relative accuracy per DV-BASI iteration")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "stepwise_relative_accuracy.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def seeds_table(all_results: list) -> tuple[str, dict]:
    """Mean ± std over seeds of every row of the DV-BASI table, and the paired differences of the
    final anisotropic iteration against each ablation. Returns ``(markdown, differences)``."""
    from .report import mean_std, pm

    names = all_results[0]["tasks"]
    keys = list(all_results[0]["theta0"]["test"])
    avg = lambda xs: sum(xs[names.index(k)] for k in keys) / len(keys)
    lines = ["| model | test accuracy, abs. (%) | rel. (%) |", "|---|---|---|",
             f"| pretrained (zero-shot) | {pm([avg(r['pretrained']) for r in all_results])} | – |",
             f"| fine-tuned (own task) | {pm([avg(r['fine_tuned']) for r in all_results])} | 100 |",
             f"| θ_0 ({all_results[0]['init']['method']}) | {pm([r['theta0']['abs'] for r in all_results])} | "
             f"{pm([r['theta0']['rel'] for r in all_results])} |"]
    runs = all_results[0].get("runs", {})
    for variant in runs:
        for m in range(len(runs[variant])):
            its = [r["runs"][variant][m] for r in all_results]
            lines.append(f"| DV-BASI {variant}, m = {m + 1} | {pm([i['abs'] for i in its])} | {pm([i['rel'] for i in its])} |")
    diffs = {}
    if "anisotropic" in runs:
        for other in (v for v in runs if v != "anisotropic"):
            d = [r["runs"]["anisotropic"][-1]["abs"] - r["runs"][other][-1]["abs"] for r in all_results]
            m, sd = mean_std(d)
            diffs[other] = dict(per_seed=d, mean=m, std=sd, beyond_one_std=m > sd if len(d) > 1 else None)
        if diffs:
            lines += ["", "Final anisotropic minus each ablation, paired by seed (points of average test accuracy):", "",
                      "| ablation | per seed | mean ± std | mean > one std |", "|---|---|---|---|"]
            for other, d in diffs.items():
                lines.append(f"| {other} | {', '.join(f'{x:+.1f}' for x in d['per_seed'])} | {d['mean']:+.1f} ± "
                             f"{d['std']:.1f} | {'yes' if d['beyond_one_std'] else 'no'} |")
    return "\n".join(lines), diffs


def _seed_path(path: Optional[str], seed: int) -> Optional[str]:
    """``--task-models`` with ``{seed}`` replaced (for example ``runs/mima/seed-{seed}/N1/checkpoints``)."""
    return None if path is None else path.replace("{seed}", str(seed))


def run_dvbasi_seeds(cfg: DVBasiConfig, seeds: int = 1, resume: bool = False,
                     log: Callable[[str], None] = print) -> dict:
    """:func:`run_dvbasi` for ``seeds`` consecutive seeds, each in ``OUT/seed-S``, with
    ``OUT/report.md`` and ``OUT/summary.json`` giving mean ± std over the seeds. The seed changes the
    task data, the fine-tuning of the task models and the coefficient batches. A ``{seed}`` in
    ``cfg.task_models`` is replaced by each seed, so every seed can use that seed's MIMA N = 1 task
    models."""
    from dataclasses import replace

    from .report import seed_list

    chosen = seed_list(cfg.seed, seeds)
    if seeds == 1:
        return run_dvbasi(replace(cfg, task_models=_seed_path(cfg.task_models, cfg.seed)), resume=resume, log=log)
    out = Path(cfg.out)
    if cfg.task_models is not None and "{seed}" not in cfg.task_models:
        log(f"warning: every seed uses the task models in {cfg.task_models} while its task data changes; put "
            "{seed} in the path to give each seed its own (e.g. runs/mima/seed-{seed}/N1/checkpoints)")
    results = []
    for k, s in enumerate(chosen):
        log(f"=== seed {s} ({k + 1} of {seeds}) ===")
        results.append(run_dvbasi(replace(cfg, seed=s, out=str(out / f"seed-{s}"), coef=replace(cfg.coef, seed=s),
                                          task_models=_seed_path(cfg.task_models, s)), resume=resume, log=log))
    table, diffs = seeds_table(results)
    title = "aTLAS" if cfg.atlas_only else "DV-BASI"
    (out / "summary.json").write_text(json.dumps(dict(seeds=chosen, table=table, differences=diffs,
                                                      runs={str(s): f"seed-{s}/results.json" for s in chosen}), indent=1))
    (out / "report.md").write_text(f"# {title} results over seeds\n\nseeds: {', '.join(map(str, chosen))}; mean ± "
                                   f"standard deviation over the seeds\n\n{table}\n\nEach seed's own report: "
                                   + ", ".join(f"`seed-{s}/`" for s in chosen) + "\n")
    log(f"\nover {seeds} seeds (mean ± std):")
    log(table)
    log(f"\nreport: {out / 'report.md'}")
    return dict(seeds=chosen, results=results, table=table, differences=diffs)
