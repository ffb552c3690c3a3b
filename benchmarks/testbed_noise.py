"""How far do the testbed's numbers move by the choice of evaluation seeds alone? The base model, split.

    python benchmarks/testbed_noise.py [--seeds 16] [--group 4] [--steps 20] [--prompt-set full]

Evaluates the unerased testbed once with --seeds seeds per prompt (cached in --base-cache, shared with
benchmarks/testbed_erasure.py), splits the images into disjoint groups of --group seeds (image j of a prompt
depends only on its seed, so each group is exactly what a --group-seed run would measure), and prints, for each
word as the erased one, every other concept's accuracy on all the seeds and on each group, and the spread
(max - min over the groups) next to the bar's allowance. A spread near the allowance means a run with --group
seeds cannot tell a miss of the bar from the luck of its seeds.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from testbed_erasure import MEASURED, allowance, base_judgements

from esd.models import TESTBED
from esd.testbed.evaluate import CONCEPTS, restrict_seeds, summarise


def spread_table(per_prompt: dict, erased: str, group: int, seeds: int) -> tuple[str, float]:
    """Markdown rows for one erased word, and the largest spread over its other concepts in allowances."""
    full = summarise(per_prompt, erased)["per_concept"]
    groups = [summarise(restrict_seeds(per_prompt, list(range(g, g + group))), erased)["per_concept"]
              for g in range(0, seeds - group + 1, group)]
    rows, worst = [], 0.0
    for c in MEASURED:
        if c == erased or c not in full:
            continue
        vals = [g[c] for g in groups]
        allowed = allowance(erased, c)
        spread = max(vals) - min(vals)
        worst = max(worst, spread / allowed)
        rows.append(f"| {erased} | {c} | {full[c]:.1%} | " + " | ".join(f"{v:.1%}" for v in vals)
                    + f" | {spread * 100:.1f} | {allowed * 100:.0f} |")
    return "\n".join(rows), worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=16, help="evaluation seeds per prompt of the one base run")
    p.add_argument("--group", type=int, default=4, help="seeds per group (the smaller protocol judged)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps of the evaluation images")
    p.add_argument("--prompt-set", default="full", choices=["full", "quick", "base"])
    p.add_argument("--base-cache", default="outputs/testbed-base-metrics.json")
    p.add_argument("--model", default=str(TESTBED))
    p.add_argument("--words", default=",".join(CONCEPTS), help="comma-separated words to take as the erased one")
    args = p.parse_args()
    if not 0 < args.group <= args.seeds // 2:
        p.error(f"--group must be between 1 and --seeds / 2 (two groups at least), got {args.group}")
    per_prompt = base_judgements(args.model, args, Path(tempfile.mkdtemp(prefix="esd-noise-")))
    n = args.seeds // args.group
    print(f"| erased | concept | {args.seeds} seeds | " + " | ".join(f"seeds {g * args.group}-{(g + 1) * args.group - 1}"
                                                              for g in range(n)) + " | spread (points) | allowance |")
    print("|---|---|---|" + "---|" * n + "---|---|")
    worst = {}
    for word in args.words.split(","):
        text, worst[word] = spread_table(per_prompt, word, args.group, args.seeds)
        print(text)
    print("\nlargest spread over the groups, in allowances: " + ", ".join(f"{w} {v:.1f}" for w, v in worst.items()))


if __name__ == "__main__":
    main()
