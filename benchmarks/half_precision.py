"""What a half-precision copy keeps of a full-length weight erase, on each family's tiny model.

    python benchmarks/half_precision.py [--families sd1,sd2-v,sdxl,sd3,flux] [--iterations 1000] [--lr 1e-5]

For each family: the paper's erase length and learning rate (ESD-x, 1000 iterations at lr 1e-5; a 4-step
sampler, as the tiny models are cheap to sample anyway) on a tiny in-process pipeline, then the share of the
change Δ = W_erased − W_base a copy in fp16 and in bf16 keeps (`esd.lowrank.kept_in`, what the model card
reports), and the median |Δ|/|W| over θ's tensors. The change's size is set by the lr and the number of steps,
not by the model's size, so the tiny models show what a real model's copy keeps at the same settings.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from esd import tiny
from esd.config import EraseConfig
from esd.erase import erase
from esd.lowrank import kept_in

BUILDERS = {"sd1": tiny.tiny_sd_pipeline, "sd2-v": tiny.tiny_sd2_pipeline, "sdxl": tiny.tiny_sdxl_pipeline,
            "sd3": tiny.tiny_sd3_pipeline, "flux": tiny.tiny_flux_pipeline}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(BUILDERS))
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-5)
    args = p.parse_args()
    print("| family | iterations | lr | median abs(Δ)/abs(W) | fp16 keeps | bf16 keeps |")
    print("|---|---|---|---|---|---|")
    for family in args.families.split(","):
        pipe = BUILDERS[family]()
        with tempfile.TemporaryDirectory() as out:
            cfg = EraseConfig(concept="a red circle", method="xattn", iterations=args.iterations, lr=args.lr,
                              ddim_steps=4, image_size=64, grid_steps=0, save_every=0, device="cpu",
                              precision="fp32", output=out)
            from esd.networks import network

            net = network(pipe)
            result = erase(cfg, pipe=pipe, progress=False)
            erased = {n: net.get_parameter(n).detach().clone() for n in result.trained}
        base = dict(network(BUILDERS[family]()).named_parameters())
        base = {n: base[n].detach() for n in erased}
        rel = statistics.median(float((erased[n] - base[n]).norm() / base[n].norm()) for n in erased)
        (k16, r16), (kbf, rbf) = (kept_in(base, erased, d) for d in (torch.float16, torch.bfloat16))
        print(f"| {family} | {args.iterations} | {args.lr:g} | {rel:.1e} | {k16:.1%} (error {r16:.2f}x) | "
              f"{kbf:.1%} (error {rbf:.2f}x) |", flush=True)


if __name__ == "__main__":
    main()
