"""What an erase spends: images through the denoising network per iteration, by part of the iteration.

A number that does not depend on a noisy machine, so designs compare by it (issue "A concept erased in a
minute"): `benchmarks/erase_cost.py` prints it beside seconds per iteration and the model card records it.
Every call of a counted denoiser adds its batch size to the part it serves; a backward pass counts as two
forwards of the trained batch (the usual rule of thumb), and gradient checkpointing's recomputation as one more
forward of it (every block is checkpointed, so the backward pass reruns the whole forward once).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from torch import Tensor

from esd.sampling import Denoiser

PARTS = ("sampler", "frozen targets", "trained forward", "backward", "checkpoint recompute", "adversary")


class WorkCounter:
    """Images through the network, by part; `per_iteration` averages over the iterations counted."""

    def __init__(self) -> None:
        self.images: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()  # forwards, each one step a GPU waits on, whatever its batch
        self.iterations = 0
        self._part: str | None = None  # set by `during`: every call inside counts there (the adversary's search)

    def wrap(self, eps: Denoiser, part: str) -> Denoiser:
        """`eps`, counting each call's batch under `part` (or under the part `during` set)."""
        def counted(x: Tensor, t: Tensor, cond) -> Tensor:
            self.images[self._part or part] += len(x)
            self.calls[self._part or part] += 1
            return eps(x, t, cond)

        return counted

    @contextlib.contextmanager
    def during(self, part: str) -> Iterator[None]:
        before, self._part = self._part, part
        try:
            yield
        finally:
            self._part = before

    def per_iteration(self, checkpointing: bool = False) -> dict[str, float]:
        """Mean images per iteration, by part, plus `total`: the backward pass as twice the trained forward, and
        with gradient `checkpointing` its recomputation as once more; `sampler calls`, the sampler's forwards
        (its sequential steps: on a GPU each costs about the same whatever its batch); and `forwards`, the calls
        of the network in all parts (a backward not counted)."""
        n = max(1, self.iterations)
        out = {part: self.images[part] / n for part in PARTS}
        out["backward"] = 2 * out["trained forward"]
        out["checkpoint recompute"] = out["trained forward"] if checkpointing else 0
        out = {part: out[part] for part in PARTS if out[part]}
        return out | {"total": sum(out.values()), "sampler calls": self.calls["sampler"] / n,
                      "forwards": sum(self.calls.values()) / n}
