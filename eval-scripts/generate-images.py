"""The 2023 `eval-scripts/generate-images.py` command line, mapped onto `esd.evaluate.generate`.

    python eval-scripts/generate-images.py --model_name outputs/vangogh --prompts_path data/artists.csv \
        --save_path images/ --num_samples 5

--model_name is an ESD weights file (esd.safetensors) or a folder holding one; `SD-V1-4` (or `original`)
means the base model without ESD weights. Images go to `{save_path}/{name}/{case_number}_{k}.png`, image k
with seed evaluation_seed + k, as in 2023. Differences, on purpose: --base_model picks the base model
(default CompVis/stable-diffusion-v1-4; 2023 hard-coded it), the default --ddim_steps is 100 as in 2023,
and images already on disk are kept, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from esd.errors import EsdError

ORIGINAL_NAMES = {"sd-v1-4", "original"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="generate-images.py", description="Generate evaluation images (2023 flags)")
    p.add_argument("--model_name", required=True, help="esd.safetensors, a folder with one, or SD-V1-4 for the base")
    p.add_argument("--prompts_path", required=True, help="CSV: case_number, prompt, evaluation_seed")
    p.add_argument("--save_path", required=True, help="images go to SAVE_PATH/<model name>/")
    p.add_argument("--device", default="auto")
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--image_size", type=int, default=None, help="default: the model's own (512 for SD1.x)")
    p.add_argument("--num_samples", type=int, default=10, help="images per prompt")
    p.add_argument("--ddim_steps", type=int, default=100)
    p.add_argument("--base_model", default="CompVis/stable-diffusion-v1-4", help="HF id, diffusers folder or CompVis file")
    return p.parse_args(argv)


def weights_of(model_name: str) -> str | None:
    """The ESD weights file named by --model_name, None for the original model."""
    if model_name.lower() in ORIGINAL_NAMES:
        return None
    path = Path(model_name)
    return str(path / "esd.safetensors" if path.is_dir() else path)


def main(argv: list[str] | None = None) -> int:
    from esd.evaluate.generate import generate_rows, read_prompts
    from esd.models import load_pipeline, resolve_device
    from esd.weights import apply_esd_weights

    a = parse_args(argv)
    try:
        rows = read_prompts(a.prompts_path)
        weights = weights_of(a.model_name)
        pipe = load_pipeline(a.base_model, resolve_device(a.device))
        if weights:
            apply_esd_weights(pipe.unet, weights)
        folder = Path(a.save_path) / Path(a.model_name.rstrip("/")).stem
        paths = generate_rows(pipe, rows, folder, a.num_samples, a.ddim_steps, a.guidance_scale, a.image_size)
    except EsdError as err:
        print(f"generate-images.py: error: {err}", file=sys.stderr)
        return 2
    print(f"{len(paths)} images in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
