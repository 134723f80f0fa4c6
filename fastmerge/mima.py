"""MIMA: iterated model averaging and fine-tuning (the paper's algorithm on fused ops).

For a budget of S fine-tuning steps per task split into N iterations (K = S / N steps each):

    θ̄ ← θ0
    for i = 1..N:
        every task t fine-tunes from θ̄ for K steps  → θ_t      (δ_t = θ_t − θ̄,  τ_t = θ_t − θ0)
        θ̄ ← uniform average of the θ_t                          (one fused op / one all_reduce)

Every task model is an image encoder whose parameters are views of one flat buffer (see
:meth:`fastmerge.FlatLayout.bind`), so the averaging phase is one :func:`fastmerge.uniform_average`
over the T buffers (or, across processes, one ``all_reduce`` of one buffer) and each iteration's
T x T cosine matrices of τ and δ come from :func:`fastmerge.task_vector_cosine`.

Each task keeps one AdamW optimizer for the whole budget: its learning rate follows one cosine
schedule with linear warm-up over the S steps, and its moment estimates carry across the averaging
phases (the budget is one fine-tuning run, interrupted by averaging). Classification heads are the
frozen zero-shot heads of :mod:`fastmerge.models`; only the image encoder trains. On the built-in
suite θ0 is the built-in pretrained CLIP of :mod:`fastmerge.pretrain` unless ``pretrained="none"``.

After N iterations the task models are merged by uniform averaging, task arithmetic and TIES, with
λ chosen on validation data from the paper's grids and without validation (λ = 0.4 and λ = 1).
Use :func:`run_mima` from Python or ``fastmerge mima`` from the command line.
"""

from __future__ import annotations

import copy
import json
import math
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
from .report import _upper

TA_GRID = tuple(round(0.05 * i, 2) for i in range(21))          # 0, 0.05, ..., 1.0
TIES_GRID = tuple(round(0.8 + 0.05 * i, 2) for i in range(21))  # 0.8, 0.85, ..., 1.8
TA_NO_VAL, TIES_NO_VAL = 0.4, 1.0

# The fine-tuning learning rate on the built-in suite: from the built-in pretrained CLIP, and from a
# random initialisation (``pretrained="none"``, which needs larger steps to learn anything).
LR_BUILTIN_PRETRAINED, LR_BUILTIN_RANDOM = 5e-4, 2e-3

# Defaults per data source: the built-in suite (the small ViT, by default pretrained by
# fastmerge.pretrain) and the paper's settings for the eight datasets on a pretrained CLIP ViT.
# The warm-up defaults to S / 10 (the paper: 200 of 2000).
BUILTIN_DEFAULTS = dict(model=models.TINY, steps=480, batch_size=64, lr=LR_BUILTIN_PRETRAINED, weight_decay=0.1)
PAPER_DEFAULTS = dict(model="ViT-B-32", steps=2000, batch_size=128, lr=1e-5, weight_decay=0.1)


@dataclass
class MimaConfig:
    """Settings of a MIMA sweep. ``None`` fields take the defaults of the data source."""

    iterations: Sequence[int] = (1, 2, 4, 8)
    model: Optional[str] = None
    pretrained: Optional[str] = None
    data_root: Optional[str] = None            # None: the built-in suite
    tasks: Optional[Sequence[str]] = None      # None: every task of the data source
    steps: Optional[int] = None                # S, the fine-tuning budget per task
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    warmup: Optional[int] = None
    seed: int = 0
    eval_limit: Optional[int] = None           # images per task for the per-iteration evaluations
    ties_density: float = 0.2
    out: str = "runs/mima"
    checkpoints: bool = True
    landscape: Optional[Sequence[str]] = "auto"   # two task names, None, or "auto": the first two tasks
    landscape_grid: int = 9
    landscape_limit: int = 200
    builtin_sizes: Optional[dict] = None      # images per split of the generated built-in tasks
    device: str = "cpu"
    num_workers: int = 0
    progress: bool = True

    def resolved(self) -> "MimaConfig":
        base = dict(BUILTIN_DEFAULTS if self.data_root is None else PAPER_DEFAULTS)
        c = copy.copy(self)
        for k, v in base.items():
            if getattr(c, k) is None and k != "lr":
                setattr(c, k, v)
        c.pretrained = models.resolve_pretrained(c.model, c.pretrained, c.data_root is None)
        if c.lr is None:
            c.lr = LR_BUILTIN_RANDOM if c.data_root is None and c.pretrained == "none" else base["lr"]
        if c.warmup is None:
            c.warmup = c.steps // 10
        c.iterations = tuple(int(n) for n in c.iterations)
        if not c.iterations or any(n < 1 for n in c.iterations):
            raise ValueError(f"iterations must be positive integers, got {list(self.iterations)}")
        for n in c.iterations:
            if c.steps % n:
                raise ValueError(f"the budget S = {c.steps} steps is not divisible by N = {n} (K = S / N must be whole)")
        if c.batch_size < 1 or c.steps < 1 or c.lr <= 0 or c.warmup < 0 or c.warmup >= c.steps:
            raise ValueError("need steps >= 1, batch_size >= 1, lr > 0 and 0 <= warmup < steps")
        if c.landscape is not None and c.landscape != "auto":
            c.landscape = tuple(c.landscape)
            if len(c.landscape) != 2 or c.landscape[0] == c.landscape[1]:
                raise ValueError("landscape needs two different task names")
        return c


def lr_at(step: int, cfg: MimaConfig) -> float:
    """Learning rate at global step ``step`` (0-based) of the S-step budget: warm-up, then cosine."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- distributed

class Dist:
    """Process-group helper: a single process, or one rank of a ``torchrun`` job."""

    def __init__(self, device: str):
        import torch.distributed as dist

        self.dist = dist
        self.enabled = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
        self.owns_group = False
        if self.enabled and not dist.is_initialized():
            from datetime import timedelta

            if device.startswith("cuda"):
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            # Rank 0 evaluates alone between collectives (per-iteration metrics, λ searches, the
            # landscape), which can take far longer than the default collective timeout.
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=12))
            self.owns_group = True
        self.rank = dist.get_rank() if self.enabled else 0
        self.world = dist.get_world_size() if self.enabled else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def min_int(self, value: int) -> int:
        """The smallest of one integer over all ranks."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MIN)
        return int(t)

    def check(self, error: Optional[BaseException]) -> None:
        """Raise on every rank when any rank has an error (so no rank is left waiting in a collective)."""
        bad = self.min_int(0 if error is not None else 1) == 0
        if error is not None:
            raise error
        if bad:
            raise RuntimeError("another rank stopped with an error (see its message)")

    def my_tasks(self, T: int) -> list[int]:
        """Contiguous blocks of tasks per rank."""
        per, extra = divmod(T, self.world)
        start = self.rank * per + min(self.rank, extra)
        return list(range(start, start + per + (1 if self.rank < extra else 0)))

    def average(self, flats: Sequence[torch.Tensor], T: int, like: torch.Tensor) -> torch.Tensor:
        """Uniform average of all T task buffers (the local ones are ``flats``)."""
        if not self.enabled:
            return fastmerge.uniform_average(list(flats))
        total = (fastmerge.task_arithmetic(torch.zeros_like(like), list(flats), 1.0) if flats
                 else torch.zeros_like(like))
        self.dist.all_reduce(total)             # the averaging phase: one all_reduce of one buffer
        return total.div_(T)

    def gather(self, flats: Sequence[torch.Tensor], mine: Sequence[int], T: int, like: torch.Tensor) -> torch.Tensor:
        """All T task buffers as one [T, d] tensor on every rank (for metrics and final merges)."""
        out = torch.zeros((T, like.numel()), dtype=like.dtype, device=like.device)
        for t, f in zip(mine, flats):
            out[t].copy_(f)
        if self.enabled:
            self.dist.all_reduce(out)           # rows are disjoint, so the sum is exact
        return out

    def barrier(self) -> None:
        if self.enabled:
            self.dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            self.dist.destroy_process_group()


# ----------------------------------------------------------------------------- setup

@dataclass
class Suite:
    tasks: list                     # TaskData
    heads: list                     # [C_t, E] frozen heads
    encoder: torch.nn.Module        # the pretrained image encoder (θ0), not trained
    layout: FlatLayout
    theta0: torch.Tensor


def load_tasks(cfg: MimaConfig, preprocess=None) -> list:
    from .data import builtin_suite, load_paper_suite

    if cfg.data_root is None:
        return builtin_suite(cfg.tasks, seed=cfg.seed, sizes=cfg.builtin_sizes)
    return load_paper_suite(cfg.data_root, cfg.tasks, transform=preprocess, seed=cfg.seed, num_workers=cfg.num_workers)


def build_suite(cfg: MimaConfig, log: Callable[[str], None] = print) -> Suite:
    """θ0, the tasks and their frozen zero-shot heads."""
    if cfg.data_root is not None:
        from .data import check_root

        check_root(cfg.data_root, cfg.tasks)
    clip, preprocess, tokenizer = models.load_clip(cfg.model, cfg.pretrained, seed=cfg.seed, device=cfg.device,
                                                   log=log, progress=cfg.progress)
    tasks = load_tasks(cfg, preprocess)
    digest = models.text_tower_digest(clip)
    heads = [models.zeroshot_head(clip, tokenizer, t.classnames, t.templates, digest=digest).to(cfg.device)
             for t in tasks]
    encoder = clip.visual
    del clip  # the text tower is only needed for the heads
    encoder.requires_grad_(False)
    layout = FlatLayout.from_module(encoder)
    theta0 = layout.flatten(encoder).to(cfg.device)
    log(f"model {cfg.model} ({'random init, seed %d' % cfg.seed if cfg.pretrained == 'none' else 'pretrained ' + cfg.pretrained}), "
        f"d = {theta0.numel():,} encoder parameters; tasks: "
        + ", ".join(f"{t.name} ({t.num_classes} classes, {t.size('train')} train)" for t in tasks))
    return Suite(tasks, heads, encoder, layout, theta0)


class Evaluator:
    """Accuracy of flat parameter vectors: one encoder module bound to a scratch buffer."""

    def __init__(self, suite: Suite):
        self.suite = suite
        self.encoder = copy.deepcopy(suite.encoder)
        self.flat = suite.layout.bind(self.encoder)

    def accuracy(self, theta: torch.Tensor, t: int, split: str = "test", limit: Optional[int] = None) -> float:
        self.flat.copy_(theta)
        return self._loaded(t, split, limit)

    def all_tasks(self, theta: torch.Tensor, split: str = "test", limit: Optional[int] = None) -> list[float]:
        self.flat.copy_(theta)
        return [self._loaded(t, split, limit) for t in range(len(self.suite.tasks))]

    def _loaded(self, t: int, split: str, limit: Optional[int]) -> float:
        return models.accuracy(self.encoder, self.suite.heads[t], self.suite.tasks[t], split, limit)


def pick_lambda(make: Callable[[float], torch.Tensor], grid: Sequence[float],
                score: Callable[[torch.Tensor], float]) -> tuple[float, float]:
    """The first λ of ``grid`` with the highest ``score(make(λ))`` (a validation score), and that score."""
    best = None
    for lam in grid:
        s = score(make(lam))
        if best is None or s > best[1]:
            best = (lam, s)
    return best


def _median(xs: Sequence[float]) -> float:
    return float(torch.tensor(list(xs), dtype=torch.float64).median()) if xs else float("nan")


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(obj, path: Path) -> None:
    """Atomic JSON write (tensors become lists)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=lambda o: o.tolist() if torch.is_tensor(o) else str(o)))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- one run (one N)

def train_phase(encoder, head, task, opt, cfg: MimaConfig, first_step: int, K: int, generator: torch.Generator,
                bar=None) -> float:
    """K AdamW steps of one task model; returns the mean training loss."""
    encoder.train()
    total = 0.0
    for k, (images, labels) in enumerate(task.train_batches(cfg.batch_size, K, generator)):
        lr = lr_at(first_step + k, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = F.cross_entropy(models.logits(encoder, head, images.to(cfg.device)), labels.to(cfg.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        total += value
        if bar is not None:
            bar.update(1)
            bar.set_postfix(task=task.name, loss=f"{value:.3f}", lr=f"{lr:.2e}", refresh=False)
    return total / max(K, 1)


def run_one(suite: Suite, cfg: MimaConfig, N: int, dist: Dist, run_dir: Path, resume: bool,
            log: Callable[[str], None] = print, stop_after: Optional[int] = None) -> Optional[dict]:
    """MIMA with N iterations. Returns the run's record and the [T, d] task models on rank 0
    (``(None, None)`` elsewhere)."""
    T = len(suite.tasks)
    K = cfg.steps // N
    mine = dist.my_tasks(T)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / f"state-rank{dist.rank}.pt"

    encoders = [copy.deepcopy(suite.encoder).requires_grad_(True) for _ in mine]
    flats = [suite.layout.bind(e) for e in encoders]
    opts = [torch.optim.AdamW(e.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay) for e in encoders]
    theta_bar = suite.theta0.clone()
    records: list[dict] = []
    start = 1
    prev_path = state_path.with_name(state_path.name.replace(".pt", ".prev.pt"))
    st = None
    if resume and state_path.is_file():
        st = torch.load(state_path, map_location=cfg.device, weights_only=False)
    if resume and dist.enabled:
        # A kill between two ranks' saves can leave them one iteration apart: all resume from the
        # oldest, each rank taking its previous state where it is ahead.
        done = dist.min_int(st["iteration"] if st is not None else 0)
        if st is not None and st["iteration"] != done:
            st = torch.load(prev_path, map_location=cfg.device, weights_only=False) if done else None
            if st is not None and st["iteration"] != done:
                raise ValueError(f"{state_path}: the ranks' resume states do not fit together")
    if st is not None:
        if st["N"] != N or st["world"] != dist.world or st["tasks"] != mine:
            raise ValueError(f"{state_path} was written by another run (N, world size or tasks differ); "
                             "use a fresh --out directory")
        for f, saved in zip(flats, st["flats"]):
            f.copy_(saved)
        for o, sd in zip(opts, st["opts"]):
            o.load_state_dict(sd)
        theta_bar.copy_(st["theta_bar"])
        records, start = st["records"], st["iteration"] + 1
        log(f"N = {N}: resuming after iteration {st['iteration']} of {N}")

    evaluator = Evaluator(suite) if dist.main else None
    bar = None
    if cfg.progress and dist.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=N * K * len(mine), initial=(start - 1) * K * len(mine), desc=f"MIMA N={N}", unit="step",
                   file=sys.stderr, dynamic_ncols=True, leave=True)
    try:
        for i in range(start, N + 1):
            t0 = time.perf_counter()
            losses = []
            for j, t in enumerate(mine):
                flats[j].copy_(theta_bar)        # every task starts the phase from θ̄
                g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + t * 10_007 + i) & 0x7FFFFFFF)
                losses.append(train_phase(encoders[j], suite.heads[t], suite.tasks[t], opts[j], cfg, (i - 1) * K, K,
                                          g, bar))
            t_train = time.perf_counter() - t0
            t1 = time.perf_counter()
            new_bar = dist.average(flats, T, theta_bar)   # the averaging phase (used by iteration i + 1)
            t_avg = time.perf_counter() - t1
            thetas = dist.gather(flats, mine, T, theta_bar)
            if dist.main:
                cos_tau = fastmerge.task_vector_cosine(suite.theta0, thetas)
                cos_delta = fastmerge.task_vector_cosine(theta_bar, thetas)
                task_acc = [evaluator.accuracy(thetas[t], t, "test", cfg.eval_limit) for t in range(T)]
                merged_acc = evaluator.all_tasks(new_bar, "test", cfg.eval_limit)
                rec = dict(iteration=i, step=i * K, seconds_train=t_train, seconds_average=t_avg,
                           cos_tau=cos_tau.tolist(), cos_delta=cos_delta.tolist(),
                           median_cos_tau=_median(_upper(cos_tau.tolist())),
                           median_cos_delta=_median(_upper(cos_delta.tolist())),
                           task_acc=task_acc, merged_acc=merged_acc, train_loss=None)
                records.append(rec)
                msg = (f"N = {N}, iteration {i}/{N}: median cos τ {rec['median_cos_tau']:.3f}, "
                       f"δ {rec['median_cos_delta']:.3f}; fine-tuned {sum(task_acc) / T:.1f} %, "
                       f"uniform average {sum(merged_acc) / T:.1f} %")
                (bar.write(msg) if bar is not None else log(msg))
            # θ̄ for the next iteration; losses are per rank, record the local ones
            theta_bar = new_bar
            if records and records[-1]["iteration"] == i:
                records[-1]["train_loss"] = {suite.tasks[t].name: l for t, l in zip(mine, losses)}
            if dist.enabled and state_path.is_file():
                os.replace(state_path, prev_path)
            _save_atomic(dict(N=N, world=dist.world, tasks=mine, iteration=i, flats=[f.clone() for f in flats],
                              opts=[o.state_dict() for o in opts], theta_bar=theta_bar, records=records),
                         state_path)
            dist.barrier()
            if stop_after is not None and i >= stop_after and i < N:
                raise _Stopped(i)
    finally:
        if bar is not None:
            bar.close()

    thetas = dist.gather(flats, mine, T, theta_bar)
    if not dist.main:
        return None, None
    rec = dict(N=N, K=K, iterations=records, final=final_merges(suite, cfg, thetas, evaluator, records, run_dir))
    return rec, thetas


class _Stopped(RuntimeError):
    """Raised by ``stop_after`` (used to test and to time-slice resumable runs)."""

    def __init__(self, i: int):
        super().__init__(f"stopped after iteration {i} as asked")
        self.iteration = i


# ----------------------------------------------------------------------------- final merges

def final_merges(suite: Suite, cfg: MimaConfig, thetas: torch.Tensor, ev: Evaluator, records: list,
                 run_dir: Path) -> dict:
    """Uniform average, task arithmetic and TIES, with and without validation; test accuracies."""
    T = len(suite.tasks)
    theta0 = suite.theta0
    ft = [ev.accuracy(thetas[t], t, "test") for t in range(T)]
    merges: dict[str, dict] = {}

    def record(name: str, theta: torch.Tensor, lam=None, val=None):
        acc = ev.all_tasks(theta, "test")
        merges[name] = dict(lam=lam, val_acc=val, test_acc=acc, abs=sum(acc) / T,
                            rel=100.0 * sum(a / max(f, 1e-9) for a, f in zip(acc, ft)) / T,
                            gap=sum(f - a for f, a in zip(ft, acc)) / T)
        return theta

    def pick(make, grid):
        return pick_lambda(make, grid, lambda theta: sum(ev.all_tasks(theta, "val")) / T)

    keep = {}
    keep["uniform"] = record("uniform", fastmerge.uniform_average(thetas))
    ties = lambda lam: fastmerge.merge_ties(theta0, thetas, density=cfg.ties_density, lam=lam)
    ta = lambda lam: fastmerge.task_arithmetic(theta0, thetas, lam)
    lam, val = pick(ta, TA_GRID)
    keep["task_arithmetic"] = record("task_arithmetic", ta(lam), lam, val)
    lam, val = pick(ties, TIES_GRID)
    keep["ties"] = record("ties", ties(lam), lam, val)
    keep["task_arithmetic_no_val"] = record("task_arithmetic_no_val", ta(TA_NO_VAL), TA_NO_VAL)
    keep["ties_no_val"] = record("ties_no_val", ties(TIES_NO_VAL), TIES_NO_VAL)
    if cfg.checkpoints:
        ck = run_dir / "checkpoints"
        ck.mkdir(exist_ok=True)
        for t in range(T):
            suite.layout.save_safetensors(thetas[t], ck / f"task-{suite.tasks[t].name}.safetensors",
                                          {"task": suite.tasks[t].name, "N": str(len(records))})
        for name, theta in keep.items():
            suite.layout.save_safetensors(theta, ck / f"merge-{name}.safetensors", {"method": name})
    last = records[-1]
    return dict(fine_tuned=ft, fine_tuned_abs=sum(ft) / T, merges=merges,
                cos_tau=last["cos_tau"], cos_delta=last["cos_delta"],
                median_cos_tau=last["median_cos_tau"], median_cos_delta=last["median_cos_delta"])


# ----------------------------------------------------------------------------- landscape

def error_landscape(suite: Suite, ev: Evaluator, thetas: torch.Tensor, a: int, b: int, grid: int = 9,
                    limit: Optional[int] = 200) -> dict:
    """Test error on a 2-D slice through θ0, θ_a and θ_b (the paper's Figure 7).

    The plane has the orthonormal basis u = τ_a / |τ_a|, v = the part of τ_b orthogonal to u; a point
    (x, y) is θ0 + x u + y v. Returns the grid, the three errors (task a, task b, their mean) and the
    coordinates of θ_a, θ_b and their average.
    """
    th0 = suite.theta0.double()
    ta, tb = thetas[a].double() - th0, thetas[b].double() - th0
    u = ta / ta.norm()
    vb = tb - (tb @ u) * u
    v = vb / vb.norm().clamp_min(1e-30)
    pa = (float(ta @ u), float(ta @ v))
    pb = (float(tb @ u), float(tb @ v))
    xs_all = [0.0, pa[0], pb[0]]
    ys_all = [0.0, pa[1], pb[1]]
    span = max(max(xs_all) - min(xs_all), max(ys_all) - min(ys_all), 1e-12)
    xs = torch.linspace(min(xs_all) - 0.25 * span, max(xs_all) + 0.25 * span, grid)
    ys = torch.linspace(min(ys_all) - 0.25 * span, max(ys_all) + 0.25 * span, grid)
    err = torch.zeros(3, grid, grid)
    for iy, y in enumerate(ys.tolist()):
        for ix, x in enumerate(xs.tolist()):
            theta = (th0 + x * u + y * v).to(suite.theta0.dtype)
            ea = 100.0 - ev.accuracy(theta, a, "test", limit)
            eb = 100.0 - ev.accuracy(theta, b, "test", limit)
            err[:, iy, ix] = torch.tensor([ea, eb, (ea + eb) / 2])
    avg = ((pa[0] + pb[0]) / 2, (pa[1] + pb[1]) / 2)
    return dict(tasks=[suite.tasks[a].name, suite.tasks[b].name], x=xs.tolist(), y=ys.tolist(),
                error=err.tolist(), theta_a=pa, theta_b=pb, average=avg)


# ----------------------------------------------------------------------------- the sweep

def run_mima(cfg: MimaConfig, resume: bool = False, log: Callable[[str], None] = print,
             stop_after: Optional[int] = None) -> Optional[dict]:
    """Run the sweep over ``cfg.iterations`` under one budget; write reports, plots and checkpoints.

    Args:
        cfg: the settings.
        resume: continue a killed run in ``cfg.out`` from its last finished iteration.
        log: where progress lines go (rank 0 only).
        stop_after: stop (raise) after this many iterations of the first unfinished N; for tests
            and time-slicing, resume later with ``resume=True``.

    Returns:
        Everything that goes into ``results.json`` (on rank 0; None on other ranks).
    """
    cfg = cfg.resolved()
    dist = Dist(cfg.device)
    if dist.enabled and cfg.device == "cuda":
        cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"   # one GPU per process
    out = Path(cfg.out)
    say = log if dist.main else (lambda _msg: None)
    try:
        out.mkdir(parents=True, exist_ok=True)
        cfg_json = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items() if k != "progress"}
        cfg_path = out / "config.json"
        error: Optional[BaseException] = None
        if resume and cfg_path.is_file():
            old = json.loads(cfg_path.read_text())
            diff = {k for k in cfg_json if k not in ("out",) and old.get(k) != cfg_json[k]}
            if diff:
                error = ValueError(f"--resume with different settings than the run in {out}: {sorted(diff)}")
        elif not resume and (any(out.glob("N*/state-rank*.pt")) or any(out.glob("N*/result.json"))):
            error = FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        dist.check(error)
        dist.barrier()
        if dist.main:
            _write_json(cfg_json, cfg_path)
        dist.barrier()
        suite = build_suite(cfg, say)
        T = len(suite.tasks)
        if T < 2:
            raise ValueError("MIMA needs at least two tasks")
        names = [t.name for t in suite.tasks]
        if cfg.landscape == "auto":
            cfg.landscape = tuple(names[:2])
        if cfg.landscape is not None:
            missing = [n for n in cfg.landscape if n not in names]
            if missing:
                raise ValueError(f"landscape tasks {missing} are not in the suite ({', '.join(names)})")
        ev = Evaluator(suite) if dist.main else None
        results: dict = dict(config=cfg_json, tasks=names, d=suite.theta0.numel(), world_size=dist.world, runs={})
        if dist.main:
            results["pretrained"] = ev.all_tasks(suite.theta0, "test")
            say(f"pretrained (zero-shot) accuracy: {sum(results['pretrained']) / T:.1f} % on average")
        t_start = time.perf_counter()
        for N in cfg.iterations:
            run_dir = out / f"N{N}"
            done = run_dir / "result.json"
            if resume and done.is_file():
                if dist.main:
                    results["runs"][str(N)] = json.loads(done.read_text())
                    say(f"N = {N}: already finished, loaded {done}")
                continue
            t0 = time.perf_counter()
            rec, thetas = run_one(suite, cfg, N, dist, run_dir, resume, say, stop_after)
            stop_after = None
            if dist.main:
                rec["seconds"] = time.perf_counter() - t0
                if cfg.landscape is not None:
                    a, b = names.index(cfg.landscape[0]), names.index(cfg.landscape[1])
                    rec["landscape"] = error_landscape(suite, ev, thetas, a, b, cfg.landscape_grid, cfg.landscape_limit)
                _write_json(rec, done)
                results["runs"][str(N)] = rec
            dist.barrier()
            # The run is finished: its resume state (task models and optimizer moments) can go.
            (run_dir / f"state-rank{dist.rank}.pt").unlink(missing_ok=True)
            (run_dir / f"state-rank{dist.rank}.prev.pt").unlink(missing_ok=True)
        if not dist.main:
            return None
        results["seconds"] = time.perf_counter() - t_start
        from .report import write_reports

        write_reports(results, out, say)
        return results
    finally:
        dist.close()


def run_mima_seeds(cfg: MimaConfig, seeds: int = 1, resume: bool = False, log: Callable[[str], None] = print,
                   stop_after: Optional[int] = None) -> Optional[dict]:
    """The sweep for ``seeds`` consecutive seeds (``cfg.seed``, ``cfg.seed + 1``, ...).

    With one seed this is :func:`run_mima`. With several, seed S runs in ``OUT/seed-S`` (its own
    report, plots and checkpoints) and ``OUT/report.md`` / ``OUT/summary.json`` give every accuracy,
    cosine and gap as mean ± standard deviation over the seeds. The seed changes the generated
    task data, the batch order and any random initialisation; the built-in pretrained CLIP is the
    same for every seed, as one published CLIP is for the papers' runs.

    Returns:
        ``{"seeds": [...], "results": [...], "summary": {...}}`` on rank 0 (None on other ranks).
    """
    from dataclasses import replace

    from .report import seed_list, write_seed_reports

    chosen = seed_list(cfg.seed, seeds)
    if seeds == 1:
        return run_mima(cfg, resume=resume, log=log, stop_after=stop_after)
    out = Path(cfg.out)
    results = []
    dist = Dist(cfg.device)      # one process group for all the seeds (each run_mima then uses it)
    try:
        for k, s in enumerate(chosen):
            if dist.main:
                log(f"=== seed {s} ({k + 1} of {seeds}) ===")
            results.append(run_mima(replace(cfg, seed=s, out=str(out / f"seed-{s}")), resume=resume, log=log,
                                    stop_after=stop_after))
    finally:
        dist.close()
    if not dist.main:
        return None
    return dict(seeds=chosen, results=results, summary=write_seed_reports(results, chosen, out, log))
