"""What rank of a LoRA extracted from a weight erase keeps the erasure, on the testbed.

    python benchmarks/lora_extraction.py --weights OUT/esd.safetensors --erased circle --ranks 1,4,16 \
        [--seeds 3] [--steps 10] [--base-metrics BASE/metrics.json] [--output DIR]

For the full erase and each rank R: the rank-R LoRA of its change (`esd.export.extract_lora`, what `esd convert
--extract-lora R` writes) applied to the shipped testbed as a client applies a LoRA — W + B·A for the adapted
weights, every other tensor (biases, norms) left at the base's — then the testbed evaluation
(`esd.testbed.evaluate.evaluate_testbed`, every prompt, the quick protocol by default). Prints one row per rank:
the extraction error, the erased concept's rate, and the other concept that fell most below the base model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from esd import kohya
from esd.export import base_model, extract_lora
from esd.lora import merged_weights
from esd.models import load_pipeline
from esd.networks import network
from esd.testbed import QUICK
from esd.testbed.evaluate import evaluate_testbed
from esd.weights import load_esd_weights


def lora_applied(pipe, lora, path) -> None:
    """W + B·A into the pipeline's UNet for each adapted layer (as a client merges a LoRA at scale 1)."""
    net = network(pipe)
    with torch.no_grad():
        for name, value in merged_weights(net, kohya.to_diffusers(lora), 1.0, path).items():
            net.get_parameter(name).copy_(value)


def evaluate(pipe, out: Path, args) -> dict:
    return evaluate_testbed(pipe, out, erased=args.erased, seeds_per_prompt=args.seeds, steps=args.steps,
                            progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, required=True, help="esd.safetensors of a weight erase of the testbed")
    p.add_argument("--erased", required=True, help="the erased testbed word")
    p.add_argument("--ranks", default="1,4,16", help="comma-separated ranks to extract")
    p.add_argument("--seeds", type=int, default=QUICK[0])
    p.add_argument("--steps", type=int, default=QUICK[1])
    p.add_argument("--base-metrics", type=Path, default=None,
                   help="metrics.json of the base testbed at the same protocol (else it is evaluated)")
    p.add_argument("--output", type=Path, default=Path("outputs/lora-extraction"))
    args = p.parse_args()

    tensors, metadata = load_esd_weights(args.weights)
    params, module_of = base_model(None, metadata, args.weights)
    if args.base_metrics is not None:
        base = json.loads(args.base_metrics.read_text())
    else:
        base = evaluate(load_pipeline(), args.output / "base", args)
    rows = []
    for rank in ["full"] + [int(r) for r in args.ranks.split(",")]:
        pipe = load_pipeline()
        if rank == "full":
            with torch.no_grad():
                for name, value in tensors.items():
                    network(pipe).get_parameter(name).copy_(value)
            error = 0.0
        else:
            lora, report = extract_lora(tensors, params, rank, "unet", args.weights, module_of)
            lora_applied(pipe, lora, args.weights)
            error = report.error
        m = evaluate(pipe, args.output / f"rank-{rank}", args)
        falls = {c: m["per_concept"][c] - base["per_concept"][c] for c in m["per_concept"]
                 if c != args.erased and base["per_concept"].get(c) is not None}
        worst = min(falls, key=falls.get)
        row = {"rank": rank, "error": error, "erased_rate": m["erased_rate"], "worst_other": worst,
               "fall": falls[worst]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{args.weights} ({metadata.get('method')}, erased {args.erased}), {args.seeds} seeds x {args.steps} steps, "
          "every prompt\n")
    print("| LoRA rank | extraction error | erased left | largest fall of another concept |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['rank']} | {r['error']:.1%} | {r['erased_rate']:.1%} | {r['worst_other']} "
              f"{r['fall'] * 100:+.1f} |")


if __name__ == "__main__":
    main()
