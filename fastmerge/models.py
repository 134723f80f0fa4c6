"""CLIP image encoders from open_clip and frozen zero-shot classification heads.

Models: ``ViT-B-32``, ``ViT-B-16`` and ``ViT-L-14`` (give a ``pretrained`` tag such as
``"openai"`` or ``"laion2b_s34b_b79k"`` to load published weights; open_clip fetches them, so they
must already be in its cache on a machine without network) and ``fastmerge-vit-tiny``, a small ViT
registered with open_clip by this module for the built-in task suite (16 x 16 images, patch 4,
4 layers of width 64). With ``pretrained=None`` a model starts from open_clip's random
initialisation, seeded.

A classification head is built the CLIP way: each class name goes through every prompt template,
the text encoder embeds the prompts, the normalised embeddings are averaged per class and
normalised again, and the result is scaled by the model's logit scale. Heads are frozen and cached
on disk (``FASTMERGE_CACHE``, default ``~/.cache/fastmerge``), keyed by a hash of the text tower's
weights, the class names and the templates. Only the image encoder trains.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

TINY = "fastmerge-vit-tiny"
MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", TINY)
_CONFIG_DIR = Path(__file__).with_name("configs")
_registered = False


def register_configs() -> None:
    """Register fastmerge's model configurations (``fastmerge-vit-tiny``) with open_clip."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(_CONFIG_DIR / f"{TINY}.json")
        _registered = True


def cache_dir() -> Path:
    return Path(os.environ.get("FASTMERGE_CACHE", Path.home() / ".cache" / "fastmerge"))


def resolve_pretrained(name: str, pretrained: Optional[str], builtin_suite: bool) -> str:
    """The default start: ``"builtin"`` for the tiny ViT on the built-in suite, else ``"none"``."""
    if pretrained is None:
        return "builtin" if builtin_suite and name == TINY else "none"
    return pretrained


def load_clip(name: str, pretrained: Optional[str] = None, seed: int = 0, device="cpu",
              log=print, progress: bool = True):
    """Create an open_clip CLIP model.

    Args:
        name: one of :data:`MODELS` (any open_clip model name also works).
        pretrained: None or ``"none"`` for a random initialisation from ``seed``; ``"builtin"``
            for ``fastmerge-vit-tiny`` pretrained by :mod:`fastmerge.pretrain` (trained and cached
            on first use); the path of a checkpoint file written by ``fastmerge pretrain --out``; or
            an open_clip pretrained tag.
        seed: seed of the random initialisation (the starting point before loaded weights).
        log, progress: messages and a progress bar while a missing built-in checkpoint trains.

    Returns:
        ``(model, preprocess, tokenizer)``; ``preprocess`` is open_clip's evaluation transform.
    """
    import open_clip

    register_configs()
    if name not in open_clip.list_models():
        raise ValueError(f"unknown model {name!r}; fastmerge supports {', '.join(MODELS)} "
                         "(and any other open_clip model name)")
    tag, weights = pretrained, None
    if pretrained is None or pretrained == "none":
        tag = None
    elif pretrained == "builtin":
        if name != TINY:
            raise ValueError(f"--pretrained builtin exists only for {TINY}; give {name} an open_clip tag or 'none'")
        from .pretrain import ensure_pretrained

        tag, weights = None, ensure_pretrained(log=log, progress=progress)
    elif pretrained.endswith(".pt") or os.sep in pretrained:
        tag, weights = None, Path(pretrained)
    with torch.random.fork_rng(devices=[]), _quiet_random_init(tag is None):
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag, device=device)
    if weights is not None:
        from .pretrain import load_weights

        load_weights(model, weights)
        model.to(device)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)


@contextlib.contextmanager
def _quiet_random_init(quiet: bool):
    """Silence open_clip's "no pretrained weights loaded" warning when a random start is what was asked."""
    if not quiet:
        yield
        return
    before = logging.root.manager.disable
    logging.disable(max(before, logging.WARNING))
    try:
        yield
    finally:
        logging.disable(before)


def text_tower_digest(model) -> str:
    """Hash of the text tower's weights (the key of cached heads)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if k.startswith("visual."):
            continue
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


@torch.no_grad()
def zeroshot_head(model, tokenizer, classnames: Sequence[str], templates: Sequence[str],
                  cache: bool = True, digest: Optional[str] = None) -> torch.Tensor:
    """Frozen zero-shot head [C, E] (logit scale folded in) from the CLIP text encoder.

    Args:
        model: an open_clip CLIP model.
        tokenizer: its tokenizer.
        classnames, templates: templates contain ``{}`` where the class name goes.
        cache: read/write the head under :func:`cache_dir`.
        digest: a precomputed hash of the text tower (see :func:`text_tower_digest`).
    """
    if not classnames or not templates:
        raise ValueError("a zero-shot head needs class names and templates")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"templates need a '{{}}' for the class name: {bad}")
    path = None
    if cache:
        key = hashlib.sha256("\x00".join([digest or text_tower_digest(model), *classnames, "\x01", *templates]).encode())
        path = cache_dir() / "heads" / f"{key.hexdigest()[:32]}.pt"
        if path.is_file():
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # a truncated cache file: rebuild it
                pass
    device = next(model.parameters()).device
    rows = []
    for name in classnames:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1).mean(0)
        rows.append(F.normalize(emb, dim=0))
    head = (torch.stack(rows) * model.logit_scale.exp().float()).cpu()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(head, tmp)
        os.replace(tmp, path)
    return head


def logits(encoder: torch.nn.Module, head: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Class logits: normalised image features times the frozen head."""
    feats = F.normalize(encoder(images), dim=-1)
    return feats @ head.to(feats.dtype).t()


@torch.no_grad()
def accuracy(encoder: torch.nn.Module, head: torch.Tensor, task, split: str = "test",
             limit: Optional[int] = None, batch_size: int = 256) -> float:
    """Top-1 accuracy (in %) of ``encoder`` with ``head`` on a task's split."""
    was_training = encoder.training
    encoder.eval()
    device = head.device
    correct = total = 0
    for images, labels in task.eval_batches(split, batch_size, limit):
        pred = logits(encoder, head, images.to(device)).argmax(-1).cpu()
        correct += int((pred == labels).sum())
        total += labels.numel()
    encoder.train(was_training)
    return 100.0 * correct / max(total, 1)
