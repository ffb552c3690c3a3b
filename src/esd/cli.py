"""The `esd` command: erase | generate | convert | testbed | evaluate | attack | app.

`esd erase` flags are generated from `EraseConfig`'s fields, so names, defaults, choices and help can
never drift from the config. `erase`, `generate` and `convert` live here; `testbed`, `evaluate`, `attack` and `app`
register themselves from their own modules. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from esd import app as app_command
from esd.attack import command as attack_command
from esd.compvis import FAMILIES, TO_CHOICES
from esd.config import HELP_GROUPS, EraseConfig
from esd.errors import EsdError, NonFiniteLossError
from esd.evaluate import command as evaluate_command
from esd.evaluate.generate import DEFAULT_GUIDANCE, DEFAULT_STEPS
from esd.export import LAYOUTS
from esd.flags import add_config_arguments, given_settings
from esd.helpformat import GroupedHelpFormatter
from esd.recipes import command as recipes_command
from esd.testbed import cli as testbed_command

# Sub-commands that live with their feature and add themselves to the parser. Imported plainly: a
# module that fails to import stops `esd` with its traceback instead of its sub-command vanishing.
FEATURE_COMMANDS = (recipes_command.register, testbed_command.register, evaluate_command.register, attack_command.register,
                    app_command.register)


def _field_help(name: str) -> str:
    """An EraseConfig field's help, for another command's flag of the same meaning."""
    return next(f.metadata["help"] for f in dataclasses.fields(EraseConfig) if f.name == name)


ERASE_DESCRIPTION = """Erase a concept from a model's weights with ESD (Gandikota et al., ICCV 2023).

The defaults shown are the paper's. A recipe goes over them: --recipe NAME|FILE, or else the one the model folder
assigns to the concept's kind (the shipped testbed has one per kind); flags given go over the recipe. `esd recipes`
lists the recipes; before training, `esd erase` prints the recipe it took and every setting that differs from the
paper's, with its source, and the output folder keeps the whole resolved config as recipe.json."""


def build_parser() -> argparse.ArgumentParser:
    from esd import __version__

    parser = argparse.ArgumentParser(prog="esd", description="Erase concepts from Stable Diffusion weights (ESD).")
    parser.add_argument("--version", action="version", version=f"esd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    erase = sub.add_parser("erase", help="erase a concept from a model's weights", description=ERASE_DESCRIPTION,
                           usage="esd erase --concept CONCEPT [--recipe NAME|FILE] [--model MODEL] [options]",
                           formatter_class=GroupedHelpFormatter)
    add_config_arguments(erase, given_only=True, groups=HELP_GROUPS)
    erase.set_defaults(run=run_erase)

    gen = sub.add_parser("generate", help="generate images from a base model, optionally with ESD weights")
    gen.add_argument("--model", default=None, help="base model: HF id, diffusers folder or CompVis file "
                                                   "(default: the shipped testbed)")
    gen.add_argument("--weights", default=None, help="an esd.safetensors file to apply to the base UNet")
    gen.add_argument("--config", default=None, help=_field_help("config"))
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one prompt (case_number 0, seed --seed)")
    what.add_argument("--prompts", help="ESD prompt CSV: case_number, prompt, evaluation_seed "
                                        "[, evaluation_guidance]")
    gen.add_argument("--seed", type=int, default=0, help="seed for --prompt (default: 0)")
    gen.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance scale")
    gen.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DDIM sampling steps")
    gen.add_argument("--num-images", type=int, default=1, help="images per prompt; image k uses seed + k")
    gen.add_argument("--image-size", type=int, default=None, help="image side (default: the model's)")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--output", required=True, help="folder for {case_number}_{k}.png")
    gen.set_defaults(run=run_generate)

    add_convert_command(sub)
    for register in FEATURE_COMMANDS:
        register(sub)
    return parser


def add_convert_command(subparsers) -> argparse.ArgumentParser:
    """`convert SRC DST [--weights FILE] [--to ...] [--config DIR_OR_YAML]`; the work is `esd.compvis.convert`."""
    parser = subparsers.add_parser(
        "convert",
        help="convert between single files (CompVis; SD3/FLUX transformers for ComfyUI) and diffusers folders, "
        "optionally applying ESD weights",
        description="Convert SRC (a CompVis .ckpt/.safetensors or a diffusers folder) to DST. With --weights, "
        "the ESD-trained parameters are applied first. CompVis -> CompVis keeps every other tensor of SRC. "
        "An SD3/FLUX pipeline to a .safetensors file writes its transformer, which ComfyUI's Load Diffusion "
        "Model node reads (text encoders and VAE stay the base's).",
    )
    parser.add_argument("src", help="CompVis .ckpt/.safetensors file or diffusers pipeline folder")
    parser.add_argument("dst", help="output: a .safetensors/.ckpt file, or a new folder")
    parser.add_argument("--weights", default=None, help="ESD weights file (safetensors, diffusers UNet names)")
    parser.add_argument("--to", choices=TO_CHOICES + LAYOUTS, default=None,
                        help="output format (default: comfyui when DST ends in .safetensors/.ckpt, else diffusers). "
                        "comfyui: one file ComfyUI reads — the CompVis checkpoint for SD1.x/SD2.x/SDXL (as "
                        "compvis), the transformer for SD3/FLUX (its Load Diffusion Model node). With SRC an "
                        "esd.safetensors: kohya (the LoRA layout AUTOMATIC1111/Forge, ComfyUI and kohya's sd-scripts "
                        "read; SD1.x/SD2.x/SDXL) or lora (diffusers' LoRA layout)")
    parser.add_argument("--extract-lora", type=int, default=None, metavar="R",
                        help="with --to kohya|lora and a weight erase (not a LoRA run): write a rank-R LoRA of the "
                        "change (per-layer SVD) and report the error at each rank")
    parser.add_argument("--model", default=None,
                        help="with --extract-lora: the base model the erase was made from (default: the one the "
                        "weights file names in its metadata)")
    parser.add_argument("--config", default=None,
                        help="for a CompVis SRC: a diffusers config folder or LDM yaml (default: detected "
                        f"from the weights; shipped: {', '.join(FAMILIES)})")
    parser.set_defaults(run=run_convert)
    return parser


def run_erase(args: argparse.Namespace) -> int:
    from esd.erase import erase
    from esd.recipes import resolve

    resolution = resolve(given_settings(args))
    result = erase(resolution.config, resolution=resolution)
    cfg = result.config
    steps = len(result.losses)
    print(f"erased {cfg.concepts} with {cfg.method}: {steps} iterations in {result.seconds:.1f} s, "
          f"final loss {result.losses[-1]:.5f}; wrote {result.output}/esd.safetensors, README.md, recipe.json, "
          "loss.png" + (", grid.png" if cfg.grid_steps else "") + (f", {result.compvis}" if result.compvis else ""))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from esd.evaluate.generate import PromptRow, generate_rows, read_prompts
    from esd.models import load_pipeline, resolve_device
    from esd.weights import apply_esd_weights

    if args.steps < 1 or args.num_images < 1:
        raise EsdError("--steps and --num-images must be >= 1")
    rows = read_prompts(args.prompts) if args.prompts else [PromptRow("0", args.prompt, args.seed)]
    pipe = load_pipeline(args.model, resolve_device(args.device), config=args.config)
    if args.weights:
        apply_esd_weights(pipe, args.weights)
    paths = generate_rows(pipe, rows, args.output, args.num_images, args.steps, args.guidance, args.image_size)
    print(f"{len(paths)} images in {Path(args.output)}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    """Convert and say where the result is. `EsdError`s propagate to `main`'s handler."""
    from esd.compvis import convert

    if args.to in LAYOUTS or args.extract_lora is not None:
        return run_export(args)
    if args.model is not None:
        raise EsdError("--model is for --extract-lora; for a model conversion SRC is the model")
    dst = convert(args.src, args.dst, weights=args.weights, to=args.to, config=args.config)
    print(f"wrote {dst}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """`esd convert ESD.safetensors --to kohya|lora DST [--extract-lora R]`: the erase as a LoRA file."""
    from esd.export import export_lora

    if args.to not in LAYOUTS:
        raise EsdError(f"--extract-lora writes a LoRA file: add --to {' or --to '.join(LAYOUTS)}")
    if args.weights is not None or args.config is not None:
        raise EsdError("--weights/--config are for model conversions; for --to kohya|lora SRC is the esd.safetensors")
    dst, report = export_lora(args.src, args.dst, args.to, rank=args.extract_lora, model=args.model)
    for line in report.lines() if report else []:
        print(line)
    print(f"wrote {dst} ({args.to} layout)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except EsdError as err:
        print(f"esd {args.command}: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"esd {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"esd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
