"""Deterministic renderer of the testbed's concepts: coloured shapes in fill styles on a plain light background.

Three kinds of concept, each a word a caption may name: a shape (circle, square, triangle), a colour (red,
green, blue, yellow) and a style (striped, dotted, outlined; the testbed's stand-in for the paper's artist
styles). An image whose caption names no style has the plain solid fill.

Each image is 32x32 RGB, drawn by point-sampling the shape on a 4x finer grid and averaging 4x4 blocks
(anti-aliasing by supersampling), so edges are smooth and a shape is recognisable at this size.
Shapes fill 45-75% of the frame (side of the bounding box) with modest position jitter: large enough
that a small model can tell a circle from a square (docs/design.md, "The testbed").
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
STYLES = ("striped", "dotted", "outlined")  # named in captions; the unnamed default is SOLID
SOLID = "solid"
FILLS = (SOLID, *STYLES)  # every fill an image can have
SIZE = 32  # image side in pixels
SUPERSAMPLE = 4  # points per pixel side; 4x4 = 16 coverage levels per pixel

# Pure, well separated hues; a small jitter around them keeps the classifier from relying on exact values.
RGB = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 70, 215),
    "yellow": (235, 195, 20),
}
SCALE_RANGE = (0.45, 0.75)  # side of the shape's bounding box / image side
JITTER = 0.12  # largest centre offset, as a fraction of the image side (kept inside the frame)
STRIPE_PERIOD = (5.0, 6.0)  # px between diagonal stripes: at 32 px a 2-3 px stripe is clearly visible
DOT_SPACING = (5.5, 6.5)  # px between the light dots of the dotted fill
DOT_RADIUS = 1.5  # px
OUTLINE_WIDTH = (2.2, 2.8)  # px of the outlined style's border
BORDER_WIDTH = 1.2  # px of solid border around striped and dotted fills, so the silhouette stays sharp

# Point-sample centres on the fine grid, in pixel units of the 32 px image: (S*4,) each.
_FINE = (np.arange(SIZE * SUPERSAMPLE) + 0.5) / SUPERSAMPLE


class Example(NamedTuple):
    """One rendered image and its labels."""

    image: Image.Image
    shape: str
    colour: str
    style: str  # one of FILLS


def _inside(shape: str, cx: float, cy: float, half: float) -> np.ndarray:
    """Which fine-grid points lie inside the shape, (4S, 4S) bool."""
    x = _FINE[None, :] - cx  # (1, 4S)
    y = _FINE[:, None] - cy  # (4S, 1)
    if shape == "circle":
        return np.broadcast_to(x**2 + y**2 <= half**2, (len(_FINE), len(_FINE)))
    if shape == "square":
        # A square of the same bounding box looks bigger than the circle; shrink it so areas are closer.
        h = half * 0.9
        return (np.abs(x) <= h) & (np.abs(y) <= h)
    if shape == "triangle":
        # Upright isosceles triangle in the bounding box: apex at top, base at bottom (y grows downwards).
        top, bottom = -half, half
        t = (y - top) / (bottom - top)  # 0 at the apex, 1 at the base
        return (y >= top) & (y <= bottom) & (np.abs(x) <= t * half)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _painted(style: str, shape: str, cx: float, cy: float, half: float, rng: np.random.Generator) -> np.ndarray:
    """Fine-grid points painted in the shape's colour for `style`, (4S, 4S) bool; style draws come last."""
    inside = _inside(shape, cx, cy, half)
    if style == SOLID:
        return inside
    if style == "outlined":
        inner = _inside(shape, cx, cy, half - rng.uniform(*OUTLINE_WIDTH))
        return inside & ~inner
    border = inside & ~_inside(shape, cx, cy, half - BORDER_WIDTH)
    x, y = _FINE[None, :], _FINE[:, None]
    if style == "striped":
        period = rng.uniform(*STRIPE_PERIOD)
        phase = rng.uniform(0, period)
        stripes = ((x + y) / np.sqrt(2) + phase) % period < period / 2  # 45-degree stripes, half painted
        return border | (inside & stripes)
    if style == "dotted":
        spacing = rng.uniform(*DOT_SPACING)
        ox, oy = rng.uniform(0, spacing, size=2)
        dx = (x - ox) % spacing - spacing / 2
        dy = (y - oy) % spacing - spacing / 2
        dots = dx**2 + dy**2 <= DOT_RADIUS**2  # light dots punched into the fill
        return border | (inside & ~dots)
    raise ValueError(f"unknown style {style!r}; expected one of {FILLS}")


def render_shape(
    shape: str | None, colour: str | None, rng: np.random.Generator, style: str = SOLID
) -> np.ndarray:
    """Draw one image as uint8 (S, S, 3); `shape=None` draws the background alone (a "no shape" example).

    Solid images draw exactly what the first testbed drew for the same generator state; a style's own random
    draws (stripe period, dot offsets, outline width) come after the shared ones.
    """
    background = rng.uniform(228, 248) + rng.uniform(-4, 4, size=3)  # light, slightly tinted grey
    img = np.broadcast_to(background, (SIZE, SIZE, 3)).astype(np.float32)
    if shape is not None:
        if colour not in RGB:
            raise ValueError(f"unknown colour {colour!r}; expected one of {COLOURS}")
        side = rng.uniform(*SCALE_RANGE) * SIZE
        half = side / 2
        cx, cy = SIZE / 2 + rng.uniform(-JITTER, JITTER, size=2) * SIZE
        # Keep the whole shape inside the frame with a one-pixel margin.
        cx = float(np.clip(cx, half + 1, SIZE - half - 1))
        cy = float(np.clip(cy, half + 1, SIZE - half - 1))
        fill = np.clip(np.array(RGB[colour], np.float32) + rng.uniform(-12, 12, size=3), 0, 255)
        painted = _painted(style, shape, cx, cy, half, rng).astype(np.float32)
        alpha = painted.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean(axis=(1, 3))[..., None]  # (S, S, 1)
        img = img * (1 - alpha) + fill * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def draw_labels(rng: np.random.Generator, p_solid: float = 0.4) -> tuple[str, str, str]:
    """A random (shape, colour, style): solid with probability `p_solid`, else one of STYLES uniformly."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = COLOURS[rng.integers(len(COLOURS))]
    style = SOLID if rng.random() < p_solid else STYLES[rng.integers(len(STYLES))]
    return shape, colour, style


def random_example(rng: np.random.Generator) -> Example:
    """A random image and its labels, all drawn from `rng`."""
    shape, colour, style = draw_labels(rng)
    return Example(Image.fromarray(render_shape(shape, colour, rng, style)), shape, colour, style)


def render(seed: int) -> Example:
    """The example for `seed`: the same seed gives the same image on every machine."""
    return random_example(np.random.default_rng(seed))


def render_batch(n: int, rng: np.random.Generator, p_solid: float = 0.4) -> tuple[np.ndarray, ...]:
    """`n` random images as uint8 (n, S, S, 3) with shape, colour and style indices (n,) into SHAPES, COLOURS, FILLS."""
    labels = [draw_labels(rng, p_solid) for _ in range(n)]
    images = np.stack([render_shape(s, c, rng, y) for s, c, y in labels])
    shapes = np.array([SHAPES.index(s) for s, _, _ in labels])
    colours = np.array([COLOURS.index(c) for _, c, _ in labels])
    styles = np.array([FILLS.index(y) for _, _, y in labels])
    return images, shapes, colours, styles


def kind_of(word: str) -> str:
    """"shape", "colour" or "style" for a testbed concept word; a ValueError naming the known words otherwise."""
    for kind, words in (("shape", SHAPES), ("colour", COLOURS), ("style", STYLES)):
        if word in words:
            return kind
    raise ValueError(f"unknown testbed concept {word!r}; known: {', '.join(SHAPES + COLOURS + STYLES)}")
