"""Contrastive pretraining of the built-in CLIP (``fastmerge-vit-tiny``) on a generated corpus.

Both papers start from a pretrained CLIP: task vectors are then small moves inside one basin, which
is why averaging, task arithmetic and block scaling work. ``fastmerge pretrain`` gives the built-in
suite such a start without any download. It trains the image and text towers of
``fastmerge-vit-tiny`` together with CLIP's symmetric contrastive loss on the image–caption corpus
of :mod:`fastmerge.data.corpus` (scenes of shapes, colours, places, dot counts, gratings, textures
and digit glyphs, with captions that name a random subset of their attributes).

Captions repeat ("a circle." fits many images), so a batch's loss treats every image whose caption
is the same string as a positive of that caption: image → text is a cross-entropy over the batch's
distinct captions, text → image spreads its target evenly over the images that carry the caption.

The result is cached under ``FASTMERGE_CACHE`` (default ``~/.cache/fastmerge``) in ``pretrained/``,
keyed by a hash of the settings, with a JSON record of the settings, the SHA-256 of the weights, the
time it took and the zero-shot accuracies. The first use of the built-in suite trains it (a few
minutes on 2 cores) under a file lock, so processes that start together train it once. The same
settings, seed and thread count give the same weights bit for bit on one machine.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import models

CORPUS_VERSION = 2     # bump when the corpus or the recipe changes what a config produces


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of the contrastive pretraining (the defaults make the built-in checkpoint)."""

    model: str = models.TINY
    seed: int = 0
    corpus_size: int = 60_000
    steps: int = 2_000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 150

    def check(self) -> "PretrainConfig":
        if self.corpus_size < 1 or self.steps < 1 or self.batch_size < 2 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("pretraining needs corpus_size >= 1, steps >= 1, batch_size >= 2, lr > 0 and "
                             "weight_decay >= 0")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup must be in [0, steps), got {self.warmup} for {self.steps} steps")
        return self

    def key(self) -> str:
        blob = json.dumps(dict(asdict(self), corpus_version=CORPUS_VERSION), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


DEFAULT = PretrainConfig()


def _lr(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, caption: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss with repeated captions.

    Args:
        img: [B, E] normalised image features.
        txt: [U, E] normalised features of the batch's distinct captions.
        caption: [B] index into ``txt`` of each image's caption.
        scale: the logit scale (a scalar).
    """
    logits = scale * img @ txt.t()                                    # [B, U]
    loss_i = F.cross_entropy(logits, caption)
    pos = F.one_hot(caption, txt.shape[0]).t().to(logits.dtype)        # [U, B]
    loss_t = -(pos / pos.sum(1, keepdim=True) * logits.t().log_softmax(1)).sum(1).mean()
    return 0.5 * (loss_i + loss_t)


def _normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 images → the built-in suite's input normalisation (mean 0.5, std 0.25 per channel)."""
    return (images.float() - 127.5) / 63.75


def pretrain(cfg: Optional[PretrainConfig] = None, log: Callable[[str], None] = print, progress: bool = True):
    """Train a CLIP from its seeded random initialisation on the generated corpus.

    Returns:
        ``(model, record)``: the open_clip model (in eval mode) and a record with the settings,
        the time taken and the loss curve.
    """
    from .data.corpus import caption_corpus

    cfg = (cfg or DEFAULT).check()
    t0 = time.perf_counter()
    model, _, tokenizer = models.load_clip(cfg.model, None, seed=cfg.seed)
    images, captions, _ = caption_corpus(cfg.corpus_size, cfg.seed)
    distinct = sorted(set(captions))
    index = {c: i for i, c in enumerate(distinct)}
    cap_ids = torch.tensor([index[c] for c in captions], dtype=torch.int64)
    tokens = tokenizer(distinct)
    log(f"pretraining {cfg.model} on {len(captions):,} generated image–caption pairs ({len(distinct):,} distinct "
        f"captions): {cfg.steps} steps of batch {cfg.batch_size}, {torch.get_num_threads()} threads")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)],
                            lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.empty(0, dtype=torch.int64)
    curve = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc="pretraining", unit="step", file=sys.stderr, dynamic_ncols=True)
    model.train()
    running = None
    try:
        for step in range(cfg.steps):
            while order.numel() < cfg.batch_size:
                order = torch.cat([order, torch.randperm(len(captions), generator=gen)])
            idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
            ids = cap_ids[idx]
            uniq, inv = torch.unique(ids, return_inverse=True)
            for g in opt.param_groups:
                g["lr"] = _lr(step, cfg)
            img = F.normalize(model.encode_image(_normalise(images[idx])), dim=-1)
            txt = F.normalize(model.encode_text(tokens[uniq]), dim=-1)
            loss = contrastive_loss(img, txt, inv, model.logit_scale.exp().clamp(max=100.0))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = loss.item()
            running = value if running is None else 0.98 * running + 0.02 * value
            if step % 50 == 0 or step == cfg.steps - 1:
                curve.append((step, value))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running:.3f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    seconds = time.perf_counter() - t0
    log(f"pretraining finished in {seconds:.0f} s (final loss {running:.3f})")
    return model, dict(config=asdict(cfg), corpus_version=CORPUS_VERSION, seconds=seconds,
                       threads=torch.get_num_threads(), distinct_captions=len(distinct), loss=curve,
                       torch=torch.__version__)


@torch.no_grad()
def zero_shot_report(model, tokenizer, suite_seed: int = 0) -> dict:
    """Zero-shot test accuracy of a CLIP on every built-in task, and on colour–shape pairs seen in the
    corpus and held out from it (classified among all 48 captions "a {colour} {shape}.")."""
    from .data import builtin_suite
    from .data.corpus import composition_probe

    tasks = builtin_suite(seed=suite_seed)
    acc = {}
    for t in tasks:
        head = models.zeroshot_head(model, tokenizer, t.classnames, t.templates, cache=False)
        acc[t.name] = models.accuracy(model.visual, head, t, "test")
    images, labels, captions, held = composition_probe()
    txt = F.normalize(model.encode_text(tokenizer(captions)).float(), dim=-1)
    img = F.normalize(model.encode_image(_normalise(images)).float(), dim=-1)
    right = ((img @ txt.t()).argmax(1) == labels).float()
    held_t = torch.tensor(held)[labels]
    return dict(zero_shot=acc, zero_shot_mean=sum(acc.values()) / len(acc),
                pairs_seen=100.0 * float(right[~held_t].mean()), pairs_held_out=100.0 * float(right[held_t].mean()),
                pairs_chance=100.0 / len(captions))


# ----------------------------------------------------------------------------- the cache

def checkpoint_path(cfg: Optional[PretrainConfig] = None) -> Path:
    """Where the weights for ``cfg`` (default: :data:`DEFAULT`) are cached (a ``.json`` record sits beside them)."""
    cfg = cfg or DEFAULT
    return models.cache_dir() / "pretrained" / f"{cfg.model}-{cfg.key()}.pt"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _mismatch(path: Path, data: bytes) -> Optional[str]:
    """Why ``data`` (the bytes of ``path``) fails the checksum in ``path``'s JSON record, or None."""
    meta = path.with_suffix(".json")
    try:
        want = json.loads(meta.read_text())["sha256"]
    except (ValueError, KeyError, TypeError):
        return f"{meta} is unreadable"
    if _sha256(data) != want:
        return f"{path} does not match the checksum in {meta.name}"
    return None


def verify(path: Path) -> Optional[str]:
    """Why the cached checkpoint at ``path`` cannot be used, or None when its checksum matches."""
    if not path.is_file() or not path.with_suffix(".json").is_file():
        return "not cached"
    return _mismatch(path, path.read_bytes())


def save_checkpoint(model, record: dict, path: Path) -> dict:
    """Write the weights and their JSON record (settings, checksum, timings) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
    record = dict(record, sha256=_sha256(tmp.read_bytes()), file=path.name)
    os.replace(tmp, path)
    meta = path.with_suffix(".json")
    tmp_meta = meta.with_name(meta.name + f".tmp{os.getpid()}")
    tmp_meta.write_text(json.dumps(record, indent=1))
    os.replace(tmp_meta, meta)
    return record


def ensure_pretrained(cfg: Optional[PretrainConfig] = None, log: Callable[[str], None] = print, progress: bool = True,
                      force: bool = False, report: bool = True) -> Path:
    """The cached checkpoint for ``cfg`` (default: :data:`DEFAULT`), trained first when it is missing or
    fails its checksum; with ``report`` the record also gets the zero-shot accuracies.

    A lock file makes concurrent callers (for example the ranks of a ``torchrun`` job) train once:
    the others wait and then load the result.
    """
    cfg = cfg or DEFAULT
    path = checkpoint_path(cfg)
    if not force and verify(path) is None:      # cached: no lock needed (the cache may be read-only)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        why = "retraining as asked" if force else verify(path)
        if why is None:
            return path
        if why != "not cached":
            log(f"warning: the cached pretrained {cfg.model} cannot be used ({why}); training it again")
        log(f"no cached pretrained {cfg.model} for these settings: training it once (cached in {path.parent})")
        model, record = pretrain(cfg, log, progress)
        if report:
            record.update(zero_shot_report(model, models.load_clip(cfg.model, None)[2]))
        save_checkpoint(model, record, path)
        if report:
            log(f"zero-shot accuracy on the built-in tasks: {record['zero_shot_mean']:.1f} % on average "
                f"({', '.join(f'{k} {v:.0f}' for k, v in record['zero_shot'].items())})")
        return path


def load_weights(model, path: Path) -> None:
    """Load a checkpoint written by :func:`save_checkpoint` (checked against its record when one exists)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no pretrained checkpoint at {path}")
    data = path.read_bytes()                     # read once: the checksum and the weights are the same bytes
    if path.with_suffix(".json").is_file():
        why = _mismatch(path, data)
        if why is not None:
            raise ValueError(f"{why}: delete the checkpoint and its .json to retrain, or run `fastmerge pretrain --force`")
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
