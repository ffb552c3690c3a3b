"""Can a full testbed evaluation run in 2 minutes on this CPU? Its work against the machine's own ceiling.

    python benchmarks/testbed_eval_speed.py [--threads 2] [--seeds 16] [--steps 50] [--probe-steps 20]

A full evaluation (`esd testbed eval`: every prompt of the full set x --seeds x --steps DDIM steps, classifier-free
guidance) is a fixed amount of UNet arithmetic. This counts it (torch's FlopCounterMode on one UNet forward),
measures in the same run how fast this machine multiplies large matrices in fp32 and bf16 (one 2048^2 GEMM at
--threads: a rate that direct and GEMM-based convolutions of 32-128 channels do not reach), and times the real
thing on one batch of the evaluation (the pipeline at the evaluation's batch size, --probe-steps steps, scaled to
--steps). It prints the evaluation's time at the GEMM rate next to the projected time and the target.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from esd.evaluate.generate import generate_product
from esd.models import TESTBED, load_pipeline
from esd.testbed.evaluate import testbed_prompts


def unet_flops(unet, tokens: int, width: int) -> float:
    """FLOPs (multiply-adds count 2) of one UNet forward on one latent, conditioned on one prompt."""
    size = unet.config.sample_size
    x = torch.randn(1, unet.config.in_channels, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500]), torch.randn(1, tokens, width))
    return float(counter.get_total_flops())


def gemm_ceiling(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """The machine's matrix-multiply rate (FLOP/s) in `dtype` at the current thread count: best of `repeats`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: thread pool and caches
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seeds", type=int, default=16, help="seeds per prompt of the evaluation")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the evaluation")
    p.add_argument("--probe-steps", type=int, default=20,
                   help="DDIM steps of the timed batch (its text encoding and VAE decoding are spread over them)")
    p.add_argument("--batch-size", type=int, default=128, help="images per pipeline call (the evaluation's)")
    p.add_argument("--target-s", type=float, default=120.0, help="the time the evaluation should take")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    pipe = load_pipeline(str(TESTBED))
    pipe.set_progress_bar_config(disable=True)
    prompts = [s.prompt for s in testbed_prompts("full")]
    n_images = len(prompts) * args.seeds
    tokens, width = pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim
    per_forward = unet_flops(pipe.unet, tokens, width)
    work = per_forward * n_images * args.steps * 2  # x2: the conditional and unconditional halves of CFG

    ceiling, bf16 = gemm_ceiling(), gemm_ceiling(torch.bfloat16)
    probe = prompts[: max(1, args.batch_size // args.seeds)]
    generate_product(pipe, probe[:1], [0], 1, batch_size=1)  # warm-up
    seconds = timed(lambda: generate_product(pipe, probe, list(range(args.seeds)), args.probe_steps,
                                             batch_size=args.batch_size))
    per_image_step = seconds / (len(probe) * args.seeds * args.probe_steps)
    projected = per_image_step * n_images * args.steps
    achieved = per_forward * 2 / per_image_step

    print(f"threads {args.threads}; {len(prompts)} prompts x {args.seeds} seeds x {args.steps} steps = "
          f"{n_images} images")
    print(f"UNet: {per_forward / 1e9:.3f} GFLOP per image-forward; the evaluation: {work / 1e12:.1f} TFLOP")
    print(f"GEMM ceiling (2048^2 matmul): fp32 {ceiling / 1e9:.0f} GFLOP/s, bf16 {bf16 / 1e9:.0f} GFLOP/s")
    print(f"needed for {args.target_s:.0f} s: {work / args.target_s / 1e9:.0f} GFLOP/s "
          f"({work / args.target_s / ceiling:.2f}x the GEMM ceiling)")
    print(f"evaluation at the GEMM ceiling: {work / ceiling:.0f} s in fp32, {work / bf16:.0f} s in bf16")
    print(f"measured: {per_image_step * 1e3:.2f} ms per image-step ({achieved / 1e9:.0f} GFLOP/s, "
          f"{achieved / ceiling:.0%} of the ceiling) -> projected evaluation {projected:.0f} s")


if __name__ == "__main__":
    main()
