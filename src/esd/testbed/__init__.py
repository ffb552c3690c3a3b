"""The testbed: a small Stable Diffusion pipeline trained on coloured shapes, and the tools to judge it.

It exists so that erasing, converting and evaluating run offline in minutes, and so that erasure efficacy
("is the circle gone?") and specificity ("are squares still squares?") are measured numbers (docs/design.md, "The testbed").
Modules: `render` (the data), `train` (the pipeline), `classifier` (labels generated images), `evaluate`
(prompts x seeds -> metrics.json) and `cli` (`esd testbed train|eval`).
"""

from esd.models import TESTBED as DEFAULT_TESTBED  # models/testbed/ at the repository's root
from esd.testbed.render import COLOURS, SHAPES

CONCEPTS = SHAPES + COLOURS
# `esd testbed eval` protocols, (seeds per prompt, DDIM steps) over every prompt: quick by default, full with --full
QUICK, FULL = (2, 10), (16, 50)

__all__ = ["COLOURS", "CONCEPTS", "DEFAULT_TESTBED", "FULL", "QUICK", "SHAPES"]
