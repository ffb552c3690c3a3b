"""How far a quick `esd testbed eval` sits from a larger protocol's figures on the same weights, per seed subset.

    python benchmarks/protocol_agreement.py --base-quick BASE/metrics.json \\
        --pair ERASE1/metrics.json:ERASE1.json --pair ERASE2/metrics.json:ERASE2.json ... \\
        --seed-sets 0,1,2 0,1 0,2 1,2

Each --pair is a quick evaluation (`esd testbed eval --erased WORD --output DIR`, its metrics.json) and the
reference for the same weights: the --json of `benchmarks/testbed_erasure.py` (16 seeds, one erase seed), whose
base figures are the reference's base. --base-quick is the base model under the quick protocol. An image depends
only on its prompt and seed, so a quick run restricted to some of its seeds (`restrict_seeds`) is what a run
with only those seeds would have measured: one run of 3 seeds gives the figures of 2 seeds, for every pair.

Prints, per seed set: the largest difference in the erased concept's rate, the largest and mean differences in
another concept's fall (accuracy after minus the base's, under each protocol), and on how many erases the
bar's verdict (`testbed_erasure.verdict`) is the same as the reference's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from testbed_erasure import summary, verdict

from esd.testbed.evaluate import restrict_seeds


def per_prompt(path: str) -> dict:
    return json.loads(Path(path).read_text())["per_prompt"]


def compare(quick: dict, quick_base: dict, reference: dict, seeds: list[int]) -> dict:
    """One erase: the quick run restricted to `seeds` against the reference (testbed_erasure's JSON)."""
    word = reference["word"]
    ref, ref_base = reference["seeds"][0]["after"], reference["base"]
    got = summary(restrict_seeds(quick, seeds), word)
    base = summary(restrict_seeds(quick_base, seeds), word)
    falls = [abs((got["per_concept"][c] - base["per_concept"][c]) - (ref["per_concept"][c] - ref_base["per_concept"][c]))
             for c, v in ref["per_concept"].items() if c != word and v is not None and base["per_concept"].get(c) is not None]
    return {"erased": abs(got["per_concept"][word] - ref["per_concept"][word]), "fall_max": max(falls),
            "fall_mean": sum(falls) / len(falls),
            "same_verdict": all(verdict(word, base, [got]).values()) == all(verdict(word, ref_base, [ref]).values())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-quick", required=True, help="metrics.json of the base model under the quick protocol")
    p.add_argument("--pair", action="append", required=True, help="QUICK_METRICS.json:REFERENCE.json, one erase")
    p.add_argument("--seed-sets", nargs="+", default=["0,1,2", "0,1", "0,2", "1,2"],
                   help="seed indices of the quick runs to keep, one comma-separated set each")
    args = p.parse_args()
    quick_base = per_prompt(args.base_quick)
    pairs = [(per_prompt(q), json.loads(Path(r).read_text())) for q, r in (s.rsplit(":", 1) for s in args.pair)]
    print("| seeds | erased rate, largest difference | a fall, largest difference | a fall, mean difference "
          "per erase | verdict same |")
    print("|---|---|---|---|---|")
    for seed_set in args.seed_sets:
        seeds = [int(s) for s in seed_set.split(",")]
        rows = [compare(q, quick_base, ref, seeds) for q, ref in pairs]
        means = [r["fall_mean"] for r in rows]
        print(f"| {seed_set} | {max(r['erased'] for r in rows):.1%} | {max(r['fall_max'] for r in rows):.1%} | "
              f"{min(means):.1%}–{max(means):.1%} | {sum(r['same_verdict'] for r in rows)} of {len(rows)} |")


if __name__ == "__main__":
    main()
