"""Erase a concept from the testbed once and measure θ every --every iterations: when is it erased, and what else moves?

    python benchmarks/erasure_trajectory.py --concept circle --erased circle [EraseConfig flags ...]
                                            [--every 20] [--eval-seeds 4] [--eval-steps 25] [--json FILE]

One erase (`esd.erase.erase`, the same flags as `esd erase`) keeps a copy of θ every --every
iterations; each copy is then measured with the testbed evaluation (`esd.testbed.evaluate`), by
default with a cheap protocol (4 seeds per "a {colour} {shape}" prompt, 25 DDIM steps), and one line
per snapshot is printed: the per-concept accuracy of the classifier. Settings are exactly the flags
given (EraseConfig's defaults otherwise: the model folder's esd.json is not applied, as in
testbed_erasure.py). A final number alone hides whether
a setting converges or oscillates; this shows it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from esd.erase import erase
from esd.flags import add_config_arguments, given_settings
from esd.models import TESTBED, load_pipeline
from esd.recipes import resolve
from esd.selection import trainable_names
from esd.testbed.evaluate import evaluate_testbed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(p, given_only=True)
    p.add_argument("--erased", required=True, help="the testbed word measured as erased, e.g. circle")
    p.add_argument("--every", type=int, default=20, help="iterations between snapshots")
    p.add_argument("--eval-seeds", type=int, default=4, help="seeds per 'a {colour} {shape}' prompt")
    p.add_argument("--eval-steps", type=int, default=25, help="DDIM steps of the evaluation images")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()
    given = given_settings(args)
    given |= {"output": given.get("output") or tempfile.mkdtemp(prefix="esd-trajectory-"), "grid_steps": 0,
              "save_every": 0}
    resolution = resolve(given)  # as `esd erase` resolves its flags: the recipe, then the flags
    cfg = resolution.config

    pipe = load_pipeline(cfg.model or str(TESTBED))
    names = trainable_names(pipe.unet, cfg.method)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def keep(i: int, loss: float) -> None:
        if (i + 1) % args.every == 0:
            snapshots[i + 1] = {n: pipe.unet.get_parameter(n).detach().clone() for n in names}

    erase(cfg, pipe=pipe, progress=True, on_step=keep, resolution=resolution)
    rows = []
    for iteration, theta in snapshots.items():
        with torch.no_grad():
            for name, value in theta.items():
                pipe.unet.get_parameter(name).copy_(value)
        out = Path(cfg.output) / f"eval-{iteration}"
        metrics = evaluate_testbed(pipe, out, args.erased, seeds_per_prompt=args.eval_seeds, steps=args.eval_steps)
        rows.append({"iteration": iteration, **metrics["per_concept"]})
        print(iteration, " ".join(f"{k}={v:.2f}" for k, v in metrics["per_concept"].items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
