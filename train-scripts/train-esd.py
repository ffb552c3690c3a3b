"""The 2023 ESD training script's command line, mapped onto `esd.erase` (nothing to edit in this file).

    python train-scripts/train-esd.py --prompt 'Van Gogh' --train_method xattn --devices 0,1 \
        --ckpt_path models/ldm/sd-v1-4-full-ema.ckpt --config_path configs/stable-diffusion/v1-inference.yaml

Differences from the 2023 script, on purpose: --lr is a float; an unknown --train_method fails at once;
the output is a folder (esd.safetensors with the config in its metadata, model card, recipe.json, loss plot,
grid) under outputs/, named as the 2023 script named its .pt file; --devices A,A (the old default 0,0) keeps
one UNet. The settings resolve as `esd erase --recipe paper` resolves them (`esd.recipes.resolve`), with this
script's flags given: the paper's Algorithm 1, whatever the model folder recommends for the concept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from esd.config import METHOD_CHOICES, EraseConfig
from esd.errors import EsdError
from esd.recipes import resolve


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train-esd.py", description="ESD training with the 2023 script's flags")
    p.add_argument("--prompt", required=True, help="concept to erase")
    p.add_argument("--train_method", required=True, choices=METHOD_CHOICES, help="parameters to train")
    p.add_argument("--start_guidance", type=float, default=3.0, help="guidance of the x_t sampler")
    p.add_argument("--negative_guidance", type=float, default=1.0, help="eta of paper Eq. 5")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--config_path", default=None, help="LDM yaml of the checkpoint (default: detected)")
    p.add_argument("--ckpt_path", default=None, help="base model: CompVis .ckpt/.safetensors or diffusers folder "
                                                     "(default: the shipped testbed)")
    p.add_argument("--diffusers_config_path", default=None,
                   help="accepted for compatibility; the diffusers UNet config is taken from the checkpoint")
    p.add_argument("--devices", default=None, help="'A,B': trained model on A, frozen copy on B; A,A keeps one")
    p.add_argument("--seperator", default=None, help="split --prompt into several concepts at this string")
    p.add_argument("--image_size", type=int, default=None, help="default: the model's own (512 for SD1.x)")
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--output", default=None, help="output folder (default: outputs/<2023-style name>)")
    return p.parse_args(argv)


def to_given(a: argparse.Namespace) -> dict:
    """The 2023 flags as the settings given to `esd.recipes.resolve` (on top of recipe paper)."""
    name = (f"compvis-word_{a.prompt.lower().replace(' ', '')}-method_{a.train_method}-sg_{a.start_guidance}"
            f"-ng_{a.negative_guidance}-iter_{a.iterations}-lr_{a.lr}")
    devices = a.devices.split(",") if a.devices else None
    same_device = devices is not None and len(devices) == 2 and devices[0] == devices[1]
    compvis_in = a.ckpt_path is not None and Path(a.ckpt_path).is_file()
    given = dict(
        recipe="paper", concept=a.prompt, method=a.train_method, start_guidance=a.start_guidance,
        eta=a.negative_guidance, iterations=a.iterations, lr=a.lr, model=a.ckpt_path, config=a.config_path,
        separator=a.seperator, image_size=a.image_size, ddim_steps=a.ddim_steps, output=a.output or f"outputs/{name}",
        device=devices[0] if same_device else "auto", devices=None if same_device or not devices else a.devices,
        # a CompVis base comes back as a CompVis file in the same format, as the 2023 script did
        save_compvis=compvis_in, compvis_format="ckpt" if compvis_in and Path(a.ckpt_path).suffix == ".ckpt"
        else "safetensors",
    )
    return {k: v for k, v in given.items() if v is not None}


def to_config(a: argparse.Namespace) -> EraseConfig:
    return resolve(to_given(a)).config


def main(argv: list[str] | None = None) -> int:
    from esd.erase import erase
    from esd.models import load_pipeline, resolve_device

    try:
        resolution = resolve(to_given(parse_args(argv)))
        cfg = resolution.config
        device = resolve_device(cfg.devices.split(",")[0] if cfg.devices else cfg.device)
        pipe = load_pipeline(cfg.model, device, config=cfg.config)
        result = erase(cfg, pipe=pipe, resolution=resolution)
    except EsdError as err:
        print(f"train-esd.py: error: {err}", file=sys.stderr)
        return 2
    pipe.unet.save_pretrained(result.output / "diffusers-unet")  # the 2023 script's diffusers UNet export
    print(f"saved {result.output}/esd.safetensors, {result.output}/diffusers-unet"
          + (f", {result.compvis}" if result.compvis else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
