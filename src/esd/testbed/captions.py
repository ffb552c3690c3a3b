"""The testbed's captions: the phrasings people write, so a concept word carries its concept wherever it stands.

A caption names some of an image's labels: its shape, its colour, and its style whenever the fill is not
solid (a caption without a style word means the plain solid fill). Phrasings vary the order, the article and
the separator: "circle", "a circle", "red circle", "a red circle", "circle, red", "a red circle, striped",
"striped". The empty caption "" is the unconditional prompt of classifier-free guidance.
"""

from __future__ import annotations

import numpy as np

from esd.testbed.render import COLOURS, SHAPES, SOLID, STYLES

# Phrasings of (shape, colour), (shape only) and (colour only); a style is appended as ", {style}".
BOTH = ("a {c} {s}", "{c} {s}", "{s}, {c}", "a {s}, {c}")
SHAPE_ONLY = ("a {s}", "{s}")
COLOUR_ONLY = ("{c}", "a {c} shape", "{c} shape")


def phrase(shape: str | None, colour: str | None, style: str | None, variant: int = 0) -> str:
    """The caption naming what is given (None: not named; SOLID is never named), in phrasing `variant`.

    `variant` indexes the phrasings of the named parts (modulo their count): variant 0 is the canonical one,
    "a red circle", "a circle", "red", and a style is added as ", striped" ("striped" alone when nothing else is).
    """
    if shape and colour:
        core = BOTH[variant % len(BOTH)].format(s=shape, c=colour)
    elif shape:
        core = SHAPE_ONLY[variant % len(SHAPE_ONLY)].format(s=shape)
    elif colour:
        core = COLOUR_ONLY[variant % len(COLOUR_ONLY)].format(c=colour)
    else:
        core = ""
    if style and style != SOLID:
        return f"{core}, {style}" if core else style
    return core


def caption_table() -> list[str]:
    """Every caption `draw_caption` can produce, in a fixed order (index 0 is the empty caption)."""
    every = (phrase(s, c, y, v) for s in (None, *SHAPES) for c in (None, *COLOURS) for y in (None, *STYLES)
             for v in range(len(BOTH)))
    return list(dict.fromkeys(["", *every]))  # unique, first occurrence order


def draw_caption(
    shape: str, colour: str, style: str, rng: np.random.Generator, p_empty: float = 0.1, p_name: float = 0.75
) -> str:
    """A training caption for an image: "" with probability `p_empty` (CFG dropout), else shape and colour each
    named with probability `p_name`, the style always when not solid, in a random phrasing."""
    if rng.random() < p_empty:
        return ""
    named_shape = shape if rng.random() < p_name else None
    named_colour = colour if rng.random() < p_name else None
    return phrase(named_shape, named_colour, style, int(rng.integers(len(BOTH) * len(SHAPE_ONLY) * len(COLOUR_ONLY))))

