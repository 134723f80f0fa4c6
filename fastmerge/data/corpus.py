"""A generated image–caption corpus for contrastive pretraining of the built-in CLIP.

Images are 16 x 16 RGB scenes from five families, drawn with the same kinds of generators as the
built-in task suite but with every attribute chosen and named:

- ``object``: one shape (circle, square, ...) of a named or unnamed colour at a place on a 3 x 3
  grid, small or large;
- ``dots``: one to six small squares, coloured;
- ``grating``: a sinusoidal grating at a named angle (multiples of 22.5 degrees), coloured;
- ``texture``: a coloured texture (stripes, checkerboard, polka dots, ...);
- ``glyph``: a digit drawn from strokes with a random slant, scale, thickness and position, then
  blurred to the look of scanned handwriting (rendered on 8 x 8 and scaled up).

Each caption names a random subset of its image's attributes with one of several phrasings
("a red circle in the top left.", "something coloured red.", "three blue dots.", ...), so the text
tower has to compose them. Some colour–shape pairs (:data:`HELD_OUT`) never occur in the corpus,
not even with a caption that leaves one of the two out: no object of an unnamed colour whose
nearest named colour makes such a pair, no dots (small squares), polka dots, concentric rings,
checkerboards or zeros painted in a colour held out from that shape. They measure whether the
pretrained model composes attributes it saw only apart.

The corpus is not the downstream tasks' data: it is drawn from its own random stream, its scenes
differ (named colours on any background, any place, any size, coloured glyphs), and its captions are
not the tasks' class names inserted into their prompt templates.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .builtin import (COUNTS, DIGITS, IMAGE_SIZE, ORIENTATIONS, POSITIONS, SHAPES, TEXTURES, _HUES, _background,
                      _bright_color, _colourize, _grating, _paint, _shape_mask, _texture, _to_uint8)

FAMILIES = ("object", "dots", "grating", "texture", "glyph")
FAMILY_WEIGHTS = (0.34, 0.15, 0.15, 0.16, 0.20)
COLOURS = tuple(_HUES)
# Colour–shape pairs that never appear together: one shape per colour.
HELD_OUT = frozenset((c, SHAPES[(i + 2) % len(SHAPES)]) for i, c in enumerate(COLOURS))
# Shapes that other families draw: dots are small squares, and some textures and glyphs are made of
# circles, rings or squares, so a held-out colour never paints them either.
_DRAWS = {"dots": "square", "polka dots": "circle", "concentric rings": "ring", "checkerboard": "square", "zero": "ring"}
_HUE_RGB = np.array(list(_HUES.values()), np.float32)


def held_out(colour: Optional[str], thing: str) -> bool:
    """Whether ``colour`` may not paint ``thing`` (a shape, or a pattern in :data:`_DRAWS`)."""
    return colour is not None and (colour, _DRAWS.get(thing, thing)) in HELD_OUT


def nearest_colour(rgb: np.ndarray) -> str:
    """The named colour closest to an RGB triple (what a caption would call an unnamed colour)."""
    return COLOURS[int(np.argmin(((_HUE_RGB - rgb[None]) ** 2).sum(1)))]

_PREFIXES = ("", "", "a photo of ", "a picture of ", "an image of ", "a drawing of ", "there is ", "this is ")

# Digit strokes in a unit box (x right, y down): polylines.
_ELLIPSE = [(0.5 + 0.3 * math.cos(a), 0.5 + 0.4 * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 14)]
_STROKES = {
    0: [_ELLIPSE],
    1: [[(0.35, 0.25), (0.52, 0.1), (0.52, 0.9)]],
    2: [[(0.22, 0.3), (0.35, 0.12), (0.65, 0.12), (0.78, 0.3), (0.7, 0.5), (0.22, 0.9), (0.82, 0.9)]],
    3: [[(0.22, 0.15), (0.7, 0.12), (0.78, 0.3), (0.45, 0.48), (0.8, 0.65), (0.7, 0.88), (0.22, 0.85)]],
    4: [[(0.65, 0.9), (0.65, 0.1), (0.15, 0.65), (0.85, 0.65)]],
    5: [[(0.8, 0.12), (0.28, 0.12), (0.25, 0.45), (0.6, 0.42), (0.8, 0.62), (0.65, 0.88), (0.22, 0.85)]],
    6: [[(0.7, 0.1), (0.38, 0.35), (0.24, 0.65), (0.36, 0.88), (0.64, 0.88), (0.77, 0.68), (0.6, 0.5), (0.3, 0.56)]],
    7: [[(0.2, 0.12), (0.8, 0.12), (0.42, 0.9)]],
    8: [[(0.5, 0.48), (0.27, 0.32), (0.35, 0.12), (0.65, 0.12), (0.73, 0.32), (0.5, 0.48), (0.24, 0.68),
         (0.34, 0.9), (0.66, 0.9), (0.76, 0.68), (0.5, 0.48)]],
    9: [[(0.75, 0.4), (0.5, 0.52), (0.26, 0.36), (0.4, 0.12), (0.68, 0.14), (0.75, 0.4), (0.68, 0.9)]],
}
_GY, _GX = (np.mgrid[0:32, 0:32].astype(np.float32) + 0.5) / 32.0


def _glyph8(rng: np.random.Generator, digit: int) -> np.ndarray:
    """A digit as an 8 x 8 image in [0, 1] with 17 grey levels (the look of scikit-learn's digits)."""
    ang = math.radians(rng.uniform(-14, 14))
    shear = rng.uniform(-0.25, 0.25)
    sx, sy = rng.uniform(0.8, 1.15), rng.uniform(0.85, 1.1)
    tx, ty = rng.uniform(-0.08, 0.08, size=2)
    ca, sa = math.cos(ang), math.sin(ang)
    dist = np.full((32, 32), np.inf, np.float32)
    for line in _STROKES[digit]:
        pts = np.array(line, np.float32) - 0.5
        pts += rng.normal(0, 0.025, size=pts.shape).astype(np.float32)
        x = (pts[:, 0] + shear * pts[:, 1]) * sx
        y = pts[:, 1] * sy
        px, py = ca * x - sa * y + 0.5 + tx, sa * x + ca * y + 0.5 + ty
        for k in range(len(pts) - 1):
            ax, ay, bx, by = px[k], py[k], px[k + 1], py[k + 1]
            dx, dy = bx - ax, by - ay
            t = np.clip(((_GX - ax) * dx + (_GY - ay) * dy) / max(dx * dx + dy * dy, 1e-9), 0, 1)
            dist = np.minimum(dist, np.hypot(_GX - ax - t * dx, _GY - ay - t * dy))
    thick = rng.uniform(0.07, 0.13)
    v = np.clip((thick - dist) / 0.03 + 0.5, 0, 1)
    v8 = v.reshape(8, 4, 8, 4).mean(axis=(1, 3))
    v8 = v8 / max(float(v8.max()), 1e-6)
    return np.round(v8 * 16) / 16


def _upsample(img8: np.ndarray) -> np.ndarray:
    """8 x 8 → 16 x 16, bilinear (as the built-in digits task scales its images)."""
    t = torch.from_numpy(img8.astype(np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                                           align_corners=False)[0, 0].clamp(0, 1).numpy()


def _pick(rng, xs):
    return xs[int(rng.integers(len(xs)))]


def _named_colour(rng, name: str) -> np.ndarray:
    rgb = np.array(_HUES[name], np.float32)
    return np.clip(rgb * rng.uniform(0.75, 1.0) + rng.normal(0, 0.05, 3), 0, 1).astype(np.float32)


def _subset(rng, keys: list[str], p: float = 0.6) -> set[str]:
    """A random non-empty subset of ``keys``."""
    while True:
        s = {k for k in keys if rng.random() < p}
        if s:
            return s


def _object(rng) -> tuple[np.ndarray, str, dict]:
    shape = _pick(rng, SHAPES)
    named = rng.random() < 0.75
    colour = None
    if named:
        colour = _pick(rng, COLOURS)
        while (colour, shape) in HELD_OUT:
            colour = _pick(rng, COLOURS)
    r = rng.uniform(2.0, 5.0)
    cy, cx = rng.uniform(max(r - 1, 1.0), IMAGE_SIZE - 1 - max(r - 1, 1.0), size=2)
    pos = POSITIONS[min(int(cy / (IMAGE_SIZE / 3)), 2) * 3 + min(int(cx / (IMAGE_SIZE / 3)), 2)]
    if rng.random() < 0.3:
        img = np.full((3, IMAGE_SIZE, IMAGE_SIZE), rng.uniform(0.3, 0.6), np.float32)
        img += rng.normal(0.0, 0.05, size=img.shape).astype(np.float32)
    else:
        img = _background(rng)
    fill = _named_colour(rng, colour) if named else _bright_color(rng)
    while not named and held_out(nearest_colour(fill), shape):
        fill = _bright_color(rng)
    img = np.clip(_paint(img, _shape_mask(shape, cy, cx, r), fill), 0, 1)
    keys = ["shape", "position"] + (["colour"] if named else [])
    say = _subset(rng, keys)
    c = f"{colour} " if "colour" in say else ""
    loc = f" {_pick(rng, ('in the', 'at the', 'placed in the', 'on the'))} {pos}" if "position" in say else ""
    if "shape" in say:
        text = f"a {c}{shape}{loc}"
    elif c:
        text = _pick(rng, (f"a {c}object{loc}", f"something {colour}{loc}", f"something coloured {colour}{loc}",
                           f"a {c}thing{loc}"))
    else:
        text = _pick(rng, (f"an object{loc}", f"a shape{loc}", f"something{loc}"))
    return img, _pick(rng, _PREFIXES) + text + ".", dict(shape=shape, colour=colour, position=pos,
                                                         looks=nearest_colour(fill))


def _dots(rng) -> tuple[np.ndarray, str, dict]:
    n = int(rng.integers(1, len(COUNTS) + 1))
    img = _background(rng)
    colour = _pick(rng, [c for c in COLOURS if not held_out(c, "dots")])
    fill = _named_colour(rng, colour)
    placed: list[tuple[int, int]] = []
    while len(placed) < n:
        y, x = rng.integers(0, IMAGE_SIZE - 2, size=2)
        if all(abs(y - py) > 2 or abs(x - px) > 2 for py, px in placed):
            placed.append((y, x))
            img[:, y:y + 2, x:x + 2] = fill[:, None, None]
    word = COUNTS[n - 1]
    noun = _pick(rng, ("dots", "squares", "spots", "small squares", "points"))
    c = f"{colour} " if rng.random() < 0.4 else ""
    text = _pick(rng, (f"{word} {c}{noun}", f"a picture with {word} {c}{noun}", f"exactly {word} {c}{noun}",
                       f"{word} {c}{noun} on a dark background"))
    return img, _pick(rng, _PREFIXES) + text + ".", dict(count=word, colour=colour)


def _grating_scene(rng) -> tuple[np.ndarray, str, dict]:
    k = int(rng.integers(len(ORIENTATIONS)))
    colour = _pick(rng, COLOURS)
    img = _colourize(rng, _grating(rng, k * 22.5 + rng.uniform(-4, 4)), 0.3, _named_colour(rng, colour))
    ang = ORIENTATIONS[k]
    c = f"{colour} " if rng.random() < 0.4 else ""
    text = _pick(rng, (f"{c}stripes at {ang}", f"a {c}grating at {ang}", f"{c}lines tilted {ang}",
                       f"{c}bands oriented at {ang}", f"a {c}wave pattern at {ang}"))
    return img, _pick(rng, _PREFIXES) + text + ".", dict(orientation=ang, colour=colour)


def _texture_scene(rng) -> tuple[np.ndarray, str, dict]:
    name = _pick(rng, TEXTURES)
    colour = _pick(rng, [c for c in COLOURS if not held_out(c, name)])
    img = _colourize(rng, _texture(rng, name), 0.35, _named_colour(rng, colour))
    c = f"{colour} " if rng.random() < 0.4 else ""
    text = _pick(rng, (f"a {c}{name} texture", f"a {c}{name} pattern", f"a surface covered in {c}{name}",
                       f"{c}{name} everywhere", f"a tile with {c}{name}"))
    return img, _pick(rng, _PREFIXES) + text + ".", dict(texture=name, colour=colour)


def _glyph(rng) -> tuple[np.ndarray, str, dict]:
    d = int(rng.integers(10))
    v = _upsample(_glyph8(rng, d))
    colour = None
    if rng.random() < 0.7:
        img = np.repeat(v[None], 3, axis=0)
    else:
        colour = _pick(rng, [c for c in COLOURS if not held_out(c, DIGITS[d])])
        img = _colourize(rng, v, 0.3, _named_colour(rng, colour))
    word = DIGITS[d]
    c = f" in {colour}" if colour is not None and rng.random() < 0.5 else ""
    text = _pick(rng, (f"the digit {word}{c}", f"a {word} written by hand{c}", f"the number {word}{c}",
                       f"a scanned {word}{c}", f"a digit: {word}{c}", f"handwriting of a {word}{c}"))
    return img, _pick(rng, _PREFIXES) + text + ".", dict(digit=word, colour=colour)


_MAKERS = {"object": _object, "dots": _dots, "grating": _grating_scene, "texture": _texture_scene, "glyph": _glyph}


def caption_corpus(n: int, seed: int = 0) -> tuple[torch.Tensor, list[str], list[str]]:
    """``n`` image–caption pairs, deterministic for a seed.

    Returns:
        ``(images, captions, families)``: uint8 images [n, 3, 16, 16], one caption and the family
        name per image.
    """
    if n < 1:
        raise ValueError(f"the corpus needs at least one image, got n = {n}")
    rng = np.random.default_rng([seed, 7_777])
    fams = rng.choice(len(FAMILIES), size=n, p=np.array(FAMILY_WEIGHTS) / sum(FAMILY_WEIGHTS))
    images = np.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    captions, families = [], []
    for i, f in enumerate(fams):
        img, text, _ = _MAKERS[FAMILIES[f]](rng)
        images[i] = img
        captions.append(text)
        families.append(FAMILIES[f])
    return _to_uint8(images), captions, families


def composition_probe(per_pair: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str], list[bool]]:
    """Object images for every colour–shape pair, to classify among the captions "a {colour} {shape}.".

    Returns:
        ``(images, labels, captions, held_out)``: uint8 images, the index of each image's pair in
        ``captions``, the captions, and for each pair whether :data:`HELD_OUT` kept it from the corpus.
    """
    rng = np.random.default_rng([seed, 9_999])
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    images, labels = [], []
    for k, (colour, shape) in enumerate(pairs):
        for _ in range(per_pair):
            r = rng.uniform(2.5, 5.0)
            cy, cx = rng.uniform(r - 1, IMAGE_SIZE - r, size=2)
            images.append(np.clip(_paint(_background(rng), _shape_mask(shape, cy, cx, r), _named_colour(rng, colour)), 0, 1))
            labels.append(k)
    return (_to_uint8(np.stack(images)), torch.tensor(labels), [f"a {c} {s}." for c, s in pairs],
            [p in HELD_OUT for p in pairs])
