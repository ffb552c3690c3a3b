"""Deterministic renderer of the testbed's concepts: coloured shapes on a plain light background.

Each image is 32x32 RGB, drawn by point-sampling the shape on a 4x finer grid and averaging 4x4 blocks
(anti-aliasing by supersampling), so edges are smooth and a shape is recognisable at this size.
Shapes fill 45-75% of the frame (side of the bounding box) with modest position jitter: large enough
that a small model can tell a circle from a square (DESIGN.md §5).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
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

# Point-sample centres on the fine grid, in pixel units of the 32 px image: (S*4,) each.
_FINE = (np.arange(SIZE * SUPERSAMPLE) + 0.5) / SUPERSAMPLE


def _coverage(shape: str, cx: float, cy: float, half: float) -> np.ndarray:
    """Fraction of each pixel inside the shape, (S, S) in [0, 1]."""
    x = _FINE[None, :] - cx  # (1, 4S)
    y = _FINE[:, None] - cy  # (4S, 1)
    if shape == "circle":
        inside = x**2 + y**2 <= half**2
    elif shape == "square":
        # A square of the same bounding box looks bigger than the circle; shrink it so areas are closer.
        h = half * 0.9
        inside = (np.abs(x) <= h) & (np.abs(y) <= h)
    elif shape == "triangle":
        # Upright isosceles triangle in the bounding box: apex at top, base at bottom (y grows downwards).
        top, bottom = -half, half
        t = (y - top) / (bottom - top)  # 0 at the apex, 1 at the base
        inside = (y >= top) & (y <= bottom) & (np.abs(x) <= t * half)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    fine = inside.astype(np.float32)
    return fine.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean(axis=(1, 3))


def render_shape(shape: str | None, colour: str | None, rng: np.random.Generator) -> np.ndarray:
    """Draw one image as uint8 (S, S, 3); `shape=None` draws the background alone (a "no shape" example)."""
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
        alpha = _coverage(shape, cx, cy, half)[..., None]  # (S, S, 1)
        img = img * (1 - alpha) + fill * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def random_example(rng: np.random.Generator) -> tuple[Image.Image, str, str]:
    """A random (image, shape, colour), all drawn from `rng`."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = COLOURS[rng.integers(len(COLOURS))]
    return Image.fromarray(render_shape(shape, colour, rng)), shape, colour


def render(seed: int) -> tuple[Image.Image, str, str]:
    """The (image, shape, colour) for `seed`: the same seed gives the same image on every machine."""
    return random_example(np.random.default_rng(seed))


def render_batch(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`n` random images as uint8 (n, S, S, 3) with shape and colour indices (n,) into SHAPES, COLOURS."""
    shapes = rng.integers(len(SHAPES), size=n)
    colours = rng.integers(len(COLOURS), size=n)
    images = np.stack([render_shape(SHAPES[s], COLOURS[c], rng) for s, c in zip(shapes, colours, strict=True)])
    return images, shapes, colours


def caption(shape: str | None, colour: str | None) -> str:
    """The training caption naming what is given: "a red circle", "a circle", "a red shape" or ""."""
    if shape and colour:
        return f"a {colour} {shape}"
    if shape:
        return f"a {shape}"
    if colour:
        return f"a {colour} shape"
    return ""
