"""What an erase leaves beside its weights: loss.png, grid.png, the model card README.md and recipe.json."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from esd.config import ETA_CONVENTION, EraseConfig, adversary_modes  # noqa: E402
from esd.evaluate.generate import DEFAULT_GUIDANCE, generate_product  # noqa: E402
from esd.evaluate.report import save_image  # noqa: E402
from esd.grids import CELL, make_grid  # noqa: E402
from esd.models import describe_model, grid_prompts, looks_like_hub_id, model_family, text_encoders_on  # noqa: E402
from esd.networks import is_transformer, network  # noqa: E402
from esd.phrasing import retain_pool  # noqa: E402
from esd.recipes import as_recipe, brief  # noqa: E402
from esd.selection import group_table  # noqa: E402
from esd.shipped import testbed_path  # noqa: E402
from esd.weights import atomic_path, split_text_encoder  # noqa: E402

GRID_SEEDS = (0, 1)


def grid_spec(pipe, cfg: EraseConfig) -> list[str]:
    """The concept prompt(s) first (and the erase-from context), then the grid prompts that name no erased concept:
    what else the erase may have changed."""
    prompts = list(cfg.concepts[:2]) + ([cfg.erase_from] if cfg.erase_from else [])
    return prompts + retain_pool(list(cfg.grid_prompts or grid_prompts(pipe)), cfg.concepts)


def _images(pipe, cfg: EraseConfig, size: int) -> list[Image.Image]:
    seeds = [cfg.seed + s for s in GRID_SEEDS]
    with text_encoders_on(pipe, network(pipe).device):  # erase keeps them off the GPU between grids
        return generate_product(pipe, grid_spec(pipe, cfg), seeds, cfg.grid_steps, DEFAULT_GUIDANCE, size,
                                progress=True)


def before_images(pipe, cfg: EraseConfig, size: int) -> list[Image.Image]:
    """The base model's grid images, made before training changes the UNet."""
    return _images(pipe, cfg, size) if cfg.grid_steps else []


def write_grid(path: Path, prompts: list[str], before: list[Image.Image], after: list[Image.Image]) -> None:
    """Rows: prompts; columns: the same seeds before and after erasing."""
    n = len(GRID_SEEDS)
    cells = [im for r in range(len(prompts)) for im in before[r * n : (r + 1) * n] + after[r * n : (r + 1) * n]]
    labels = [f"{when}, seed +{s}" for when in ("before", "after") for s in GRID_SEEDS]
    save_image(make_grid(cells, 2 * n, row_labels=[p[:28] for p in prompts], col_labels=labels, cell=CELL), path)


def write_loss_plot(path: Path, losses: list[float]) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.7, alpha=0.5, label="loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
                  for i in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("ESD loss (MSE to Eq. 5 target)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def trained_groups_table(pipe, trained: list[str]) -> str:
    """Markdown table: for each module group of the denoising network, how much of it was trained."""
    lines = ["| module group | trained tensors | trained parameters |", "|---|---|---|"]
    for group, n_tensors, all_tensors, n_params, all_params in group_table(network(pipe), trained):
        mark = "all" if n_tensors == all_tensors else ("none" if n_tensors == 0 else "part")
        lines.append(f"| {group} | {n_tensors} of {all_tensors} ({mark}) | {n_params:,} of {all_params:,} |")
    return "\n".join(lines)


def use_snippet(cfg: EraseConfig, base: str, part: str) -> str:
    """How to load the weights with diffusers alone: a LoRA file through load_lora_weights, else load_state_dict."""
    if cfg.lora_rank:
        return f"""`esd.safetensors` is a LoRA file (rank {cfg.lora_rank}, scale 1) in diffusers' layout; its metadata
(`esd_config`) holds the whole configuration.

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights(".", weight_name="esd.safetensors")  # this folder
pipe.fuse_lora()  # optional: merge it into the weights
image = pipe("{cfg.concepts[0]}").images[0]
```""" + ("""

`esd-kohya.safetensors` is the same LoRA in kohya's layout: put it in AUTOMATIC1111/Forge's `models/Lora` (prompt
`<lora:esd-kohya:1>`) or ComfyUI's `models/loras` (LoraLoader node, strength 1); `pipe.load_lora_weights(".",
weight_name="esd-kohya.safetensors")` reads it too.""" if cfg.save_kohya else "")
    if cfg.train_text_encoder:
        return f"""`esd.safetensors` holds the trained `pipe.{part}` parameters under their diffusers names and the trained
`pipe.text_encoder` parameters under `text_encoder.<name>`; both parts must be loaded (the erase changed both).
Its metadata (`esd_config`) holds the whole configuration.

```python
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

pipe = DiffusionPipeline.from_pretrained("{base}")
weights = load_file("esd.safetensors")
text = {{k.removeprefix("text_encoder."): v for k, v in weights.items() if k.startswith("text_encoder.")}}
net = {{k: v for k, v in weights.items() if not k.startswith("text_encoder.")}}
for module, part in ((pipe.{part}, net), (pipe.text_encoder, text)):
    loaded = module.load_state_dict(part, strict=False)  # strict=False: the file holds only the trained tensors
    assert not loaded.unexpected_keys, f"not tensors of this model: {{loaded.unexpected_keys[:3]}}"
image = pipe("{cfg.concepts[0]}").images[0]
```"""
    return f"""`esd.safetensors` holds only the trained `pipe.{part}` parameters, under their diffusers names; its metadata
(`esd_config`) holds the whole configuration.

```python
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

pipe = DiffusionPipeline.from_pretrained("{base}")
weights = load_file("esd.safetensors")
# strict=False because the file holds only the trained tensors; check that it fits this model all the same
loaded = pipe.{part}.load_state_dict(weights, strict=False)
assert not loaded.unexpected_keys, f"not tensors of this model: {{loaded.unexpected_keys[:3]}}"
assert set(pipe.{part}.state_dict()) - set(loaded.missing_keys) == set(weights), "not every tensor was loaded"
image = pipe("{cfg.concepts[0]}").images[0]
```"""


def half_line(half: dict[str, tuple[float, float]] | None, cfg: EraseConfig) -> str:
    """The card's figure for a half-precision copy: the share of the erase's change it keeps (esd.lowrank.kept_in)."""
    if half is None:
        return ("a LoRA: the change stays apart from the weights until it is merged" if cfg.lora_rank else
                "not measured (θ too large to keep a copy of); `esd convert` measures it when it writes a half-precision file")
    return "; ".join(f"a copy in {name} keeps {kept:.1%} of the change (rounding error {ratio:.2f}x the change)"
                     for name, (kept, ratio) in half.items())


def work_line(work: dict[str, float]) -> str:
    """Images through the denoising network per iteration, by part (esd.cost), as one line."""
    if not work:
        return "—"
    parts = ", ".join(f"{part} {n:.1f}" for part, n in work.items() if part not in ("total", "sampler calls", "forwards"))
    return (f"{work['total']:.1f} images ({parts}; a backward counts as two forwards) in "
            f"{work.get('forwards', 0):.1f} forwards, the sampler's {work.get('sampler calls', 0):.1f} of them one "
            f"after another")


def adversary_embeddings(cfg: EraseConfig) -> str:
    """What the --robust adversary optimises: prefix embeddings before the prompt, or one embedding in the word's
    place (word, inversion), or both in turn."""
    kinds = set(adversary_modes(cfg.robust_adversary))
    parts = ([f"{cfg.robust_tokens} prefix embeddings"] if "prefix" in kinds else []) + (
        ["one word embedding"] if kinds & {"word", "inversion"} else [])
    return " or ".join(parts)


def base_name(pipe, cfg: EraseConfig) -> str:
    """The base model as a card names it: the Hugging Face id or the path the user gave, never this machine's
    absolute path to the shipped testbed."""
    source = str(getattr(pipe, "esd_source", None) or cfg.model or "")
    if cfg.model is None or Path(source).resolve() == testbed_path().resolve():
        return "esd-testbed"  # models/testbed/ of the esd package
    return cfg.model


def settings_table(result) -> str:
    """Every setting that differs from the paper's, with where it came from (recipe, flag, model folder)."""
    res = result.resolution
    lines = [f"Recipe **{res.recipe.name}** ({res.chosen_by}): {res.recipe.description}", "",
             "| setting | value | from |", "|---|---|---|"]
    for name, (value, source) in res.changes(run_fields=False).items():
        lines.append(f"| {name} | `{brief(value)}` | {source} |")
    return "\n".join(lines) + "\n\nEvery other setting is the paper's. `recipe.json` beside this card reruns it: " \
        "`esd erase --recipe recipe.json`."


# Licenses of the base models people erase from, by Hugging Face id (the card repeats the base's license: an erased
# model is a derivative of it). Ids not listed get no license line; the user adds theirs.
BASE_LICENSES = {
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-2-1-base": "openrail++",
    "stabilityai/stable-diffusion-2-base": "openrail++",
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
    "black-forest-labs/FLUX.1-schnell": "apache-2.0",
}
FAMILY_TAGS = {"sd1": ["stable-diffusion"], "sd2": ["stable-diffusion"], "sdxl": ["stable-diffusion-xl"],
               "sd3": ["stable-diffusion-3"], "flux": ["flux"], "flux2": ["flux"]}


def card_metadata(cfg: EraseConfig, family: str, base: str) -> str:
    """The card's YAML header, which the Hub and `huggingface_hub.ModelCard.load` read: base model (a Hugging Face
    id only: a local path means nothing there), library, pipeline tag, tags, and the base's license when known."""
    from huggingface_hub import ModelCardData

    hub_id = looks_like_hub_id(base)
    tags = ["esd", "concept-erasure", *FAMILY_TAGS.get(family, []), "text-to-image"] + (["lora"] if cfg.lora_rank
                                                                                        else [])
    data = ModelCardData(base_model=base if hub_id else None, library_name="diffusers", pipeline_tag="text-to-image",
                         license=BASE_LICENSES.get(base, "mit" if base == "esd-testbed" else None), tags=tags)
    return data.to_yaml()


def model_card(cfg: EraseConfig, pipe, result) -> str:
    base = base_name(pipe, cfg)
    load = "models/testbed" if base == "esd-testbed" else base  # the testbed's folder in a checkout of esd
    net = network(pipe)
    part = "transformer" if is_transformer(net) else "unet"  # the pipeline attribute the weights belong to
    net_names, text_names = (list(part) for part in split_text_encoder(dict.fromkeys(result.trained)))
    n_trained = sum(net.get_parameter(n).numel() for n in net_names)
    n_text = sum(pipe.text_encoder.get_parameter(n).numel() for n in text_names)
    n_total = sum(p.numel() for p in net.parameters())
    final = sum(result.losses[-20:]) / max(1, len(result.losses[-20:]))
    return f"""---
{card_metadata(cfg, model_family(pipe), base)}
---
# ESD: "{cfg.concept}" erased from {base}

Erased with [ESD](https://arxiv.org/abs/2303.07345) (Gandikota et al., ICCV 2023) by the `esd` package.

| setting | value |
|---|---|
| base model | `{base}` |
| model family | {describe_model(pipe, cfg.image_size)}; the Eq. 5 target is applied to this native output |
| concept(s) | {", ".join(f"`{c}`" for c in cfg.concepts)} |
| erase from | {f"`{cfg.erase_from}`" if cfg.erase_from else "—"} |
| method | `{cfg.method}` ({f"a rank-{cfg.lora_rank} LoRA update of its layers, " if cfg.lora_rank else ""}{len(net_names)} tensors, {n_trained:,} trained parameters; the {part} has {n_total:,}) |
| text encoder | {f"trained: {len(text_names)} tensors, {n_text:,} parameters (its layers; embeddings kept), lr {cfg.text_encoder_lr or cfg.lr}" if text_names else "frozen"} |
| adversarial erasing | {f"`--robust` ({cfg.robust_adversary}): {adversary_embeddings(cfg)}, {cfg.robust_steps} attack steps (lr {cfg.robust_lr}) every {cfg.robust_every} iteration(s){f', {cfg.robust_images} images of the concept' if 'inversion' in cfg.robust_adversary else ''}" if cfg.robust else "off"} |
| η (negative guidance) | {cfg.eta} — {ETA_CONVENTION} |
| start guidance s | {cfg.start_guidance} |
| iterations | {len(result.losses)} of {cfg.iterations}{" (stopped early)" if result.stopped_early else ""} |
| learning rate | {cfg.lr} (Adam) |
| sampling steps N | {cfg.ddim_steps} ({"flow-matching Euler" if is_transformer(net) else "DDIM"}); x_t sampled by the {"model being trained (paper)" if cfg.sample_from == "esd" else "frozen model (2025 code)"} |
| seed | {cfg.seed} |
| precision | frozen weights {cfg.precision}{"" if cfg.precision == "fp32" else " (forwards under autocast)"}; trained parameters and Adam state fp32 |
| recipe | `{result.resolution.recipe.name}` ({result.resolution.chosen_by}); the settings it and the flags changed are listed below |
| network evaluations per iteration | {work_line(result.work)} |
| final loss (mean of last 20) | {final:.5f} |
| wall time | {result.seconds:.1f} s |
| CompVis single file | {f"`{result.compvis.name}` (for AUTOMATIC1111/ComfyUI)" if result.compvis else "— (`--save-compvis` writes one)"} |
| kohya LoRA file | {f"`{result.kohya.name}` (AUTOMATIC1111/Forge, ComfyUI, kohya's sd-scripts)" if result.kohya else "— (`--save-kohya` with `--lora-rank`; for a weight erase `esd convert esd.safetensors --to kohya DST --extract-lora R`)"} |
| in half precision | {half_line(result.half, cfg)} |

## Settings

{settings_table(result)}

## What was trained

{trained_groups_table(pipe, net_names)}

![before/after](grid.png)

![loss](loss.png)

## Use it

{use_snippet(cfg, load, part)}

or: `esd generate{"" if base == "esd-testbed" else f" --model {base}"} --weights esd.safetensors --prompt "{cfg.concepts[0]}" --output images/`

## Configuration

```json
{json.dumps(json.loads(cfg.to_json()), indent=2)}
```
"""


def write_outputs(out: Path, cfg: EraseConfig, pipe, result, before: list[Image.Image], size: int) -> None:
    """loss.png, grid.png (when the grid is on) and README.md beside esd.safetensors."""
    write_loss_plot(out / "loss.png", result.losses)
    if cfg.grid_steps:
        write_grid(out / "grid.png", grid_spec(pipe, cfg), before, _images(pipe, cfg, size))
    with atomic_path(out / "README.md") as tmp:
        tmp.write_text(model_card(cfg, pipe, result), encoding="utf-8")
    with atomic_path(out / "recipe.json") as tmp:  # `esd erase --recipe OUT/recipe.json` repeats the run
        tmp.write_text(json.dumps(as_recipe(result.resolution), indent=2) + "\n", encoding="utf-8")
