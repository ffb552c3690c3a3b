"""The one image-grid builder: erase previews, evaluation reports, testbed samples and testbed evaluation.

Images come row-major and every cell has the same size. Small images (the testbed's 32 px) are scaled up with
nearest-neighbour so their pixels stay crisp; large ones are scaled down with bicubic. Optional labels go
in a margin: row labels on the left, column labels on top, so the cells themselves are the images untouched.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

CELL = 128  # a cell side that keeps 32 px testbed images visible and 512 px SD images small
LABEL_PAD = 4  # pixels around a label
GAP = 8  # white space between two pictures put side by side


def fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` as RGB at `size`: nearest when scaling up (no blur on tiny images), bicubic when scaling down."""
    image = image.convert("RGB")
    if image.size == size:
        return image
    return image.resize(size, Image.NEAREST if image.width < size[0] else Image.BICUBIC)


def make_grid(
    images: list[Image.Image | None],
    cols: int,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    cell: int | None = None,
    scale: int = 1,
) -> Image.Image:
    """Paste `images` (row-major; None leaves a cell blank) into a grid of `cols` columns on white.

    Each cell is `cell` x `cell` pixels, or the first image's size times `scale` when `cell` is None.
    """
    if cell:
        cw, ch = cell, cell
    else:
        first = next(im for im in images if im is not None)
        cw, ch = first.width * scale, first.height * scale
    rows = math.ceil(len(images) / cols)
    font = ImageFont.load_default()
    left = _label_width(row_labels, font)
    top = _label_height(col_labels, font)
    grid = Image.new("RGB", (left + cols * cw, top + rows * ch), "white")
    for i, image in enumerate(images):
        if image is not None:
            grid.paste(fit(image, (cw, ch)), (left + (i % cols) * cw, top + (i // cols) * ch))
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(col_labels or []):
        draw.text((left + c * cw + LABEL_PAD, LABEL_PAD), text, fill="black", font=font)
    for r, text in enumerate(row_labels or []):
        y0, y1 = draw.textbbox((0, 0), text, font=font)[1::2]
        draw.text((LABEL_PAD, top + r * ch + (ch - y0 - y1) // 2), text, fill="black", font=font)
    return grid


def _label_width(labels: list[str] | None, font) -> int:
    """Width of the left margin: the longest row label plus padding (0 without labels)."""
    if not labels:
        return 0
    return max(math.ceil(font.getlength(text)) for text in labels) + 2 * LABEL_PAD


def _label_height(labels: list[str] | None, font) -> int:
    """Height of the top margin: the tallest column label plus padding (0 without labels)."""
    if not labels:
        return 0
    return max(font.getbbox(text)[3] for text in labels) + 2 * LABEL_PAD


def beside(a: Image.Image, b: Image.Image, gap: int = GAP) -> Image.Image:
    """Picture `a` on the left, `b` on the right, a white gap between them (two grids to compare)."""
    out = Image.new("RGB", (a.width + gap + b.width, max(a.height, b.height)), "white")
    out.paste(a, (0, 0))
    out.paste(b, (a.width + gap, 0))
    return out
