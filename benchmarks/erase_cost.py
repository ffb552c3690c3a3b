"""Seconds per iteration and peak memory of `esd erase` under several configurations, as ratios to a
baseline measured in the same run.

    python benchmarks/erase_cost.py --size tiny|testbed|sd1-full|sd3|flux [--iterations N] [--ddim-steps N]
                                    [--device D] [--configs a,b,...] [--recipe NAME --concept C] [--json FILE]

With --recipe, every configuration starts from that recipe's settings (as `esd erase --recipe NAME` does; the
testbed's recipes erase one of its words, e.g. --concept circle), the configuration's own settings over them.
Beside seconds per iteration it prints the images through the denoising network per iteration (`esd.cost`),
a count that does not depend on how busy the machine is.

The baseline reproduces the original cost model: two full UNets in fp32 (a frozen copy beside the
trained one), the sampler's conditional and unconditional forwards run separately. Each configuration
runs in its own process, so peak memory is its own: CUDA max allocated on a GPU; on a CPU the peak RSS above
what the process held before building the pipeline (the interpreter, torch and diffusers, the same ~0.6 GiB in
every configuration; the raw peak RSS is in the JSON too).
Speed and memory do not depend on the weights' values, so `sd1-full` is SD1.x's UNet with random weights
(its text encoder and VAE are small stand-ins of the right widths: they hardly cost anything per
iteration). `sd3` and `flux` are transformers of the real models' width with fewer blocks, so that two of
them fit this 24 GiB, 2-core machine (`TRANSFORMER_SIZES`): SD3-medium's 1536 wide MMDiT blocks (24 heads of
64) four deep, and FLUX.1's 3072 wide blocks (24 heads of 128), one dual-stream and two single-stream; their text
encoders are small stand-ins (a 77 + 512 token sequence, as the real ones give). Iteration times exclude the
first iteration (warm-up) when there are several.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {  # name -> EraseConfig overrides; `devices` is filled in with the run's device twice for baseline
    "baseline": {"devices": "SAME", "guidance_batch": False, "sampler_batch": False, "gradient_checkpointing": False,
                 "precision": "fp32"},
    "default": {},
    "fp32": {"precision": "fp32"},  # SD3/FLUX: the frozen weights in fp32 (the default there is bf16)
    "no-checkpointing": {"gradient_checkpointing": False},
    "checkpointing": {"gradient_checkpointing": True},  # the default before it followed need
    "compiled": {"compile": True},  # torch.compile (inductor); the first iterations include the compile
    "bf16": {"precision": "bf16"},
    "fast": {"trajectory_reuse": 8},
    "one-at-a-time": {"sampler_batch": False},  # each example's partial trajectory alone, as before batching
    "sampler-5-steps": {"ddim_steps": 5},  # the sampler's DDIM grid (k ~ U[0, N)): fewer steps, fewer forwards
    "sampler-10-steps": {"ddim_steps": 10},
    "bf16+fast": {"precision": "bf16", "trajectory_reuse": 8},
}


def build_pipeline(size: str):
    """The pipeline to erase from, built in-process (nothing is downloaded)."""
    import torch

    from esd import tiny

    if size == "tiny":
        return tiny.tiny_sd_pipeline(seed=0)
    if size == "testbed":
        from esd.models import TESTBED, load_pipeline

        if not (TESTBED / "model_index.json").exists():
            sys.exit(f"no testbed at {TESTBED}")
        return load_pipeline(str(TESTBED), "cpu")
    if size == "sd1-full":
        from diffusers import UNet2DConditionModel

        from esd.compvis import CONFIGS as CONFIG_DIR
        from esd.models import sd_pipeline

        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG_DIR / "sd1" / "unet"))
        text = tiny.tiny_text_encoder(hidden_size=768)  # SD1.x's width; depth does not matter here
        return sd_pipeline(tiny.tiny_vae(), text, unet)
    if size in TRANSFORMER_SIZES:
        return transformer_pipeline(size)
    sys.exit(f"unknown --size {size}")


# Real widths, fewer blocks (the real ones: SD3-medium 24 MMDiT blocks, 2B; FLUX.1 19 dual + 38 single, 12B).
TRANSFORMER_SIZES = {
    "sd3": dict(patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=64,
                num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192, sample_size=128),
    "flux": dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=128,
                 num_attention_heads=24, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
}


def transformer_pipeline(size: str):
    """A tiny SD3/FLUX pipeline whose transformer is replaced by one of the real width (random weights)."""
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from esd import tiny

    torch.manual_seed(0)
    pipe = tiny.tiny_sd3_pipeline() if size == "sd3" else tiny.tiny_flux_pipeline()
    text = pipe.transformer.config.joint_attention_dim  # the stand-in encoders' widths
    pooled = pipe.transformer.config.pooled_projection_dim
    cls = SD3Transformer2DModel if size == "sd3" else FluxTransformer2DModel
    pipe.transformer = cls(joint_attention_dim=text, pooled_projection_dim=pooled, **TRANSFORMER_SIZES[size])
    return pipe


def worker(args: argparse.Namespace) -> None:
    """Run one configuration and print one JSON line."""
    import torch

    from esd.config import EraseConfig
    from esd.erase import erase
    from esd.models import resolve_device
    from esd.recipes import resolve

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    overrides = dict(CONFIGS[args.worker])
    if overrides.get("devices") == "SAME":
        overrides["devices"] = f"{device},{device}"
    libraries = rss_bytes()  # the interpreter, torch and diffusers: the same in every configuration
    pipe = build_pipeline(args.size)
    stamps: list[float] = []

    def tick(i: int, loss: float) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        given = {"concept": args.concept, "iterations": args.iterations, "image_size": args.image_size, "seed": 0,
                 "device": str(device), "grid_steps": 0, "save_every": 0, "output": out, **overrides}
        if args.recipe:  # the recipe's settings, then this configuration's
            cfg = resolve({"recipe": args.recipe, **given}).config
        else:
            cfg = EraseConfig(method=args.method, ddim_steps=args.ddim_steps, **given)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = erase(cfg, pipe=pipe, progress=False, on_step=tick)
        total = time.perf_counter() - start
    times = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]
    timed = times[1:] if len(times) > 1 else times
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:  # what the models and the run hold, as CUDA's allocated bytes would: peak RSS above the libraries'
        peak = rss_peak - libraries
    print(json.dumps({"config": args.worker, "s_per_iter": sum(timed) / len(timed), "peak_bytes": peak,
                      "peak_rss_bytes": rss_peak, "iterations": args.iterations, "total_s": total,
                      "images_per_iter": result.work}))


def rss_bytes() -> int:
    """This process's resident memory now (Linux; 0 elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def run_all(args: argparse.Namespace) -> list[dict]:
    names = args.configs.split(",")
    if "baseline" not in names and not args.no_baseline:
        names = ["baseline", *names]
    rows = []
    for name in names:
        cmd = [sys.executable, __file__, "--worker", name, "--size", args.size, "--iterations", str(args.iterations),
               "--ddim-steps", str(args.ddim_steps), "--device", args.device, "--method", args.method,
               "--concept", args.concept] + (["--recipe", args.recipe] if args.recipe else [])
        if args.image_size:
            cmd += ["--image-size", str(args.image_size)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  {name}: {rows[-1]['s_per_iter']:.3f} s/iter, {rows[-1]['peak_bytes'] / 2**30:.2f} GiB",
              file=sys.stderr)
    base = next((r for r in rows if r["config"] == "baseline"), None)
    for r in rows:
        r["speed_ratio"] = r["s_per_iter"] / base["s_per_iter"] if base else None
        r["memory_ratio"] = r["peak_bytes"] / base["peak_bytes"] if base else None
    return rows


def markdown(rows: list[dict], args: argparse.Namespace, device: str) -> str:
    what = f"recipe `{args.recipe}`, concept `{args.concept}`" if args.recipe else \
        f"method `{args.method}`, DDIM steps {args.ddim_steps}"
    lines = [f"size `{args.size}`, {what}, {args.iterations} iterations, device {device}", "",
             "| config | s/iter | images/iter (sampler; its forwards) | forwards/iter | peak GiB | time vs baseline | "
             "images vs baseline | memory vs baseline |", "|---|---|---|---|---|---|---|---|"]
    base = next((r for r in rows if r["config"] == "baseline"), None)
    for r in rows:
        ratios = [f"{r[k]:.2f}x" if r[k] is not None else "—" for k in ("speed_ratio", "memory_ratio")]
        work = r.get("images_per_iter", {})
        images = f"{work['total'] / base['images_per_iter']['total']:.2f}x" if base and work else "—"
        lines.append(f"| {r['config']} | {r['s_per_iter']:.3f} | {work.get('total', 0):.1f} ({work.get('sampler', 0):.1f}; "
                     f"{work.get('sampler calls', 0):.1f}) | {work.get('forwards', 0):.1f} "
                     f"| {r['peak_bytes'] / 2**30:.2f} | {ratios[0]} | {images} | {ratios[1]} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["tiny", "testbed", "sd1-full", *TRANSFORMER_SIZES], default="tiny")
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--device", default="auto")
    p.add_argument("--method", default="xattn")
    p.add_argument("--recipe", default=None, help="start every configuration from this recipe (e.g. paper, "
                                                   "testbed-shape); --method and --ddim-steps are then the recipe's")
    p.add_argument("--concept", default="a red circle", help="the concept erased (with a testbed recipe: its word)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per run (torch's default otherwise; on a busy machine 1 avoids oversubscription)")
    p.add_argument("--no-baseline", action="store_true", help="time only --configs (no ratios)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    import torch

    from esd.models import resolve_device

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    rows = run_all(args)
    print(markdown(rows, args, name))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
