"""The built-in task suite: small-image classification tasks that need no download.

Six tasks are drawn deterministically from a seeded generator (shapes, colours, stripe
orientation, dot counting, position on a 3 x 3 grid, textures) and one is real data that ships
with scikit-learn (its 8 x 8 handwritten digits, upsampled). Every image is 16 x 16 RGB. The tasks
share one input space but need different features, so models fine-tuned on them independently
pull a shared encoder in different directions: merging them loses accuracy, which is what the
MIMA experiments need to show anything.

Each task comes with class names and prompt templates, so its classification head can be built
from a CLIP text encoder exactly as for the paper's datasets.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .common import InMemoryImages, TaskData

IMAGE_SIZE = 16
DEFAULT_SIZES = {"train": 2000, "val": 300, "test": 600}
_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)

_HUES = {  # class name -> RGB at full saturation
    "red": (1.0, 0.1, 0.1), "orange": (1.0, 0.55, 0.05), "yellow": (0.95, 0.95, 0.1),
    "green": (0.1, 0.85, 0.15), "cyan": (0.1, 0.9, 0.9), "blue": (0.15, 0.25, 1.0),
    "purple": (0.6, 0.15, 0.9), "pink": (1.0, 0.45, 0.75),
}


def _background(rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(0.0, 0.35, size=(3, 1, 1)).astype(np.float32)
    return np.clip(base + rng.normal(0.0, 0.06, size=(3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32), 0, 1)


def _bright_color(rng: np.random.Generator) -> np.ndarray:
    c = rng.uniform(0.3, 1.0, size=3).astype(np.float32)
    c[rng.integers(3)] = 1.0
    return c


def _paint(img: np.ndarray, mask: np.ndarray, color: np.ndarray) -> np.ndarray:
    m = np.clip(mask, 0.0, 1.0)[None]
    return img * (1 - m) + color[:, None, None] * m


def _shape_mask(kind: str, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = _YY - cy, _XX - cx
    if kind == "circle":
        return (dy ** 2 + dx ** 2 <= r ** 2).astype(np.float32)
    if kind == "square":
        return ((abs(dy) <= r * 0.85) & (abs(dx) <= r * 0.85)).astype(np.float32)
    if kind == "triangle":
        return ((dy <= r * 0.8) & (dy >= -r) & (abs(dx) <= (dy + r) * 0.6)).astype(np.float32)
    if kind == "cross":
        return (((abs(dy) <= r * 0.3) & (abs(dx) <= r)) | ((abs(dx) <= r * 0.3) & (abs(dy) <= r))).astype(np.float32)
    if kind == "ring":
        d = np.sqrt(dy ** 2 + dx ** 2)
        return ((d <= r) & (d >= r * 0.55)).astype(np.float32)
    if kind == "diamond":
        return (abs(dy) + abs(dx) <= r).astype(np.float32)
    raise ValueError(kind)


# ------------------------------------------------------------------------------ generators
# Each takes (rng, label) and returns a float32 [3, 16, 16] image in [0, 1].

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")


def _gen_shapes(rng, label):
    r = rng.uniform(3.0, 5.0)
    cy, cx = rng.uniform(r, IMAGE_SIZE - 1 - r, size=2)
    return _paint(_background(rng), _shape_mask(SHAPES[label], cy, cx, r), _bright_color(rng))


def _gen_colors(rng, label):
    img = np.full((3, IMAGE_SIZE, IMAGE_SIZE), rng.uniform(0.3, 0.6), np.float32)
    img += rng.normal(0.0, 0.05, size=img.shape).astype(np.float32)
    rgb = np.array(list(_HUES.values())[label], np.float32)
    color = np.clip(rgb * rng.uniform(0.75, 1.0) + rng.normal(0, 0.05, 3), 0, 1).astype(np.float32)
    r = rng.uniform(3.0, 5.5)
    cy, cx = rng.uniform(r, IMAGE_SIZE - 1 - r, size=2)
    kind = SHAPES[rng.integers(len(SHAPES))]
    return np.clip(_paint(img, _shape_mask(kind, cy, cx, r), color), 0, 1)


ORIENTATIONS = tuple(f"{a:g} degrees" for a in np.arange(0, 180, 22.5))


def _grating(rng, degrees: float) -> np.ndarray:
    """A sinusoidal grating [16, 16] in [0, 1] at ``degrees`` (random frequency and phase)."""
    ang = math.radians(degrees)
    freq = rng.uniform(0.22, 0.4)
    return 0.5 + 0.5 * np.sin(2 * math.pi * freq * (_XX * math.cos(ang) + _YY * math.sin(ang)) + rng.uniform(0, 2 * math.pi))


def _colourize(rng, v: np.ndarray, dark: float, color: Optional[np.ndarray] = None) -> np.ndarray:
    """Blend a dark random colour (channels below ``dark``) into ``color`` (default: a random bright
    one) by the pattern ``v`` in [0, 1], plus pixel noise."""
    a = _bright_color(rng) if color is None else color
    b = rng.uniform(0, dark, size=3).astype(np.float32)
    img = b[:, None, None] + (a - b)[:, None, None] * v.astype(np.float32)[None]
    return np.clip(img + rng.normal(0, 0.05, size=img.shape), 0, 1).astype(np.float32)


def _gen_orientation(rng, label):
    return _colourize(rng, _grating(rng, label * 22.5 + rng.uniform(-4, 4)), 0.3)


COUNTS = ("one", "two", "three", "four", "five", "six")


def _gen_count(rng, label):
    img = _background(rng)
    color = _bright_color(rng)
    n, placed = label + 1, []
    while len(placed) < n:
        y, x = rng.integers(0, IMAGE_SIZE - 2, size=2)
        if all(abs(y - py) > 2 or abs(x - px) > 2 for py, px in placed):
            placed.append((y, x))
            img[:, y:y + 2, x:x + 2] = color[:, None, None]
    return img


POSITIONS = tuple(f"{v} {h}" for v in ("top", "middle", "bottom") for h in ("left", "center", "right"))


def _gen_position(rng, label):
    cell = IMAGE_SIZE / 3
    r = rng.uniform(1.5, 2.4)
    cy = (label // 3 + 0.5) * cell + rng.uniform(-1, 1)
    cx = (label % 3 + 0.5) * cell + rng.uniform(-1, 1)
    kind = SHAPES[rng.integers(len(SHAPES))]
    return _paint(_background(rng), _shape_mask(kind, cy, cx, r + 0.6), _bright_color(rng))


TEXTURES = ("stripes", "checkerboard", "polka dots", "noise", "concentric rings", "smooth gradient")


def _texture(rng, name: str) -> np.ndarray:
    """One of :data:`TEXTURES` as a pattern [16, 16] in [0, 1] (random period and offset)."""
    p = rng.uniform(2.5, 4.5)
    oy, ox = rng.uniform(0, p, size=2)
    y, x = _YY + oy, _XX + ox
    if name == "stripes":
        v = np.floor((x if rng.random() < 0.5 else y) / p) % 2
    elif name == "checkerboard":
        v = (np.floor(x / p) + np.floor(y / p)) % 2
    elif name == "polka dots":
        v = (((x % (2 * p)) - p) ** 2 + ((y % (2 * p)) - p) ** 2 <= (p * 0.55) ** 2).astype(np.float32)
    elif name == "noise":
        v = (rng.random((IMAGE_SIZE, IMAGE_SIZE)) < 0.5).astype(np.float32)
    elif name == "concentric rings":
        cy, cx = rng.uniform(4, 12, size=2)
        v = np.floor(np.sqrt((_YY - cy) ** 2 + (_XX - cx) ** 2) / (p * 0.6)) % 2
    elif name == "smooth gradient":
        ang = rng.uniform(0, 2 * math.pi)
        v = (_XX * math.cos(ang) + _YY * math.sin(ang))
        v = (v - v.min()) / (v.max() - v.min() + 1e-6)
    else:
        raise ValueError(name)
    return v


def _gen_texture(rng, label):
    return _colourize(rng, _texture(rng, TEXTURES[label]), 0.35)


DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

_GENERATED: dict[str, tuple[Callable, Sequence[str], Sequence[str]]] = {
    "shapes": (_gen_shapes, SHAPES, ("a photo of a {}.", "a {} shape.", "a drawing of a {}.")),
    "colors": (_gen_colors, tuple(_HUES), ("a photo of a {} object.", "something coloured {}.", "the colour {}.")),
    "orientation": (_gen_orientation, ORIENTATIONS, ("stripes at {}.", "a grating oriented at {}.", "lines tilted {}.")),
    "count": (_gen_count, COUNTS, ("a photo of {} dots.", "{} small squares.", "a picture with {} spots.")),
    "position": (_gen_position, POSITIONS, ("an object in the {}.", "a shape at the {} of the image.", "something placed {}.")),
    "textures": (_gen_texture, TEXTURES, ("a {} texture.", "a photo of a {} pattern.", "a surface with {}.")),
}
_DIGIT_TEMPLATES = ("a photo of the digit {}.", "a handwritten {}.", "the number {}.")

TASKS = tuple(_GENERATED) + ("digits",)
_SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


def _to_uint8(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8))


def _generated_task(name: str, seed: int, sizes: dict[str, int]) -> TaskData:
    gen, classes, templates = _GENERATED[name]
    splits = {}
    for split, n in sizes.items():
        task_index = list(_GENERATED).index(name)
        rng = np.random.default_rng([seed, task_index, _SPLIT_SEEDS[split]])
        labels = np.arange(n) % len(classes)
        rng.shuffle(labels)
        images = np.stack([gen(rng, int(y)) for y in labels]) if n else np.zeros((0, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
        splits[split] = InMemoryImages(_to_uint8(images), torch.from_numpy(labels.astype(np.int64)))
    return TaskData(name, tuple(classes), tuple(templates), splits, image_size=IMAGE_SIZE)


def _digits_task(seed: int, fractions=(0.1, 0.3)) -> TaskData:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("the built-in 'digits' task needs scikit-learn (pip install scikit-learn)") from exc
    d = load_digits()
    img = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # [n, 1, 8, 8] in [0, 1]
    img = torch.nn.functional.interpolate(img, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    img = img.clamp(0, 1).expand(-1, 3, -1, -1).numpy()
    labels = d.target.astype(np.int64)
    # Stratified split: the same fraction of every class goes to val and test.
    rng = np.random.default_rng([seed, 1000])
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val, n_test = round(len(idx) * fractions[0]), round(len(idx) * fractions[1])
        parts["val"] += idx[:n_val].tolist()
        parts["test"] += idx[n_val:n_val + n_test].tolist()
        parts["train"] += idx[n_val + n_test:].tolist()
    splits = {}
    for split, idx in parts.items():
        idx = np.array(sorted(idx))
        splits[split] = InMemoryImages(_to_uint8(img[idx]), torch.from_numpy(labels[idx]))
    return TaskData("digits", DIGITS, _DIGIT_TEMPLATES, splits, image_size=IMAGE_SIZE)


def builtin_task(name: str, seed: int = 0, sizes: Optional[dict[str, int]] = None) -> TaskData:
    """One task of the built-in suite.

    Args:
        name: one of :data:`TASKS`.
        seed: seed of the generated images (``digits`` uses it only for its split).
        sizes: images per split for generated tasks (default :data:`DEFAULT_SIZES`).
    """
    if name == "digits":
        return _digits_task(seed)
    if name not in _GENERATED:
        raise ValueError(f"unknown built-in task {name!r}; choose from {', '.join(TASKS)}")
    return _generated_task(name, seed, dict(DEFAULT_SIZES if sizes is None else sizes))


def builtin_suite(tasks: Optional[Sequence[str]] = None, seed: int = 0,
                  sizes: Optional[dict[str, int]] = None) -> list[TaskData]:
    """The built-in suite (all of :data:`TASKS` by default), deterministic for a given seed."""
    return [builtin_task(n, seed, sizes) for n in (TASKS if tasks is None else tasks)]
