"""Erase a concept from the shipped testbed and measure it: is it gone, is the rest intact?

    python benchmarks/testbed_erasure.py --concept circle [EraseConfig flags ...] [--seeds 16] [--steps 50]
                                          [--json FILE]

Runs `esd.erase.erase` with the given settings (the same flags as `esd erase`), then the testbed
measurement (`esd.testbed.evaluate.evaluate_testbed`) on the erased model, and prints one JSON line:
wall time of the erase, erased-concept rate, mean accuracy of the other concepts of the same kind and
the base model's numbers for comparison (measured once and cached in --base-cache).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from esd.cli import add_config_arguments, config_from_args
from esd.models import TESTBED, load_pipeline
from esd.testbed.evaluate import evaluate_testbed
from esd.testbed.render import COLOURS, SHAPES

WORDS = {*COLOURS, *SHAPES}


def measure(pipe, erased: str, seeds: int, steps: int, out: Path) -> dict:
    m = evaluate_testbed(pipe, out, erased, seeds_per_prompt=seeds, steps=steps)
    return {"erased_rate": m["erased_rate"], "others_mean_accuracy": m["others_mean_accuracy"],
            "per_concept": m["per_concept"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(p)
    p.add_argument("--seeds", type=int, default=16, help="seeds per 'a {colour} {shape}' prompt")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the evaluation images")
    p.add_argument("--base-cache", default="outputs/testbed-base-metrics.json")
    p.add_argument("--json", default=None)
    p.add_argument("--erased", default=None,
                   help="the testbed word measured as erased (default: the concept's last word that is one)")
    args = p.parse_args()
    cfg = config_from_args(args)
    cfg.output = cfg.output or tempfile.mkdtemp(prefix="esd-bench-")
    cfg.grid_steps = 0
    word = args.erased or next((w for w in reversed(cfg.concept.replace(",", " ").split()) if w in WORDS),
                               cfg.concept.split()[-1])

    cache = Path(args.base_cache)
    key = f"{word}/{args.seeds}/{args.steps}"
    base_all = json.loads(cache.read_text()) if cache.exists() else {}
    if key not in base_all:
        base_all[key] = measure(load_pipeline(str(TESTBED)), word, args.seeds, args.steps, Path(cfg.output) / "base")
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(base_all, indent=2))
    pipe = load_pipeline(str(TESTBED))
    start = time.perf_counter()
    from esd.erase import erase

    erase(cfg, pipe=pipe, progress=False)
    seconds = time.perf_counter() - start
    after = measure(pipe, word, args.seeds, args.steps, Path(cfg.output) / "eval")
    row = {"concept": cfg.concept, "method": cfg.method, "lr": cfg.lr, "eta": cfg.eta, "iterations": cfg.iterations,
           "ddim_steps": cfg.ddim_steps, "trajectory_reuse": cfg.trajectory_reuse, "erase_s": round(seconds, 1),
           "base": base_all[key], "after": after}
    print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
