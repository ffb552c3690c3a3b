"""The testbed's model card (README.md): what it is, how it was trained, how far apart its text encoder keeps
concept words, and its measured quality per phrasing and per concept."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from esd.testbed.recipe import VAE_FACTOR, TrainConfig
from esd.testbed.render import COLOURS, SHAPES, STYLES


def write_model_card(
    out_dir: Path, cfg: TrainConfig, state: dict, sizes: dict[str, int], metrics: dict | None, command: str,
    similarity: dict[str, float] | None = None,
) -> None:
    """README.md: what the testbed is, how it was trained (command, data, steps, time) and its measured quality."""
    lines = [
        "# ESD testbed: a small Stable Diffusion pipeline that draws coloured shapes in fill styles",
        "",
        "A complete diffusers `StableDiffusionPipeline` (AutoencoderKL + CLIP text encoder + CLIP tokenizer +",
        "SD1.x-layout UNet2DConditionModel + DDIM scheduler) trained on 32x32 renders of",
        f"{', '.join(SHAPES)} in {', '.join(COLOURS)}, solid or {', '.join(STYLES)}, on a plain light background.",
        "Three kinds of concept to erase: objects (shapes), colours and styles (the fills, the testbed's stand-in",
        "for artist styles). It exists so that erasing, converting and evaluating with `esd` run offline in",
        "minutes, with measurable efficacy and specificity.",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        'pipe = StableDiffusionPipeline.from_pretrained("models/testbed", safety_checker=None)',
        'image = pipe("a red circle, striped").images[0]  # 32x32, DDIM 50 steps, guidance 7.5',
        "```",
        "",
        "## Model",
        f"- UNet: {sizes['unet'] / 1e6:.2f} M parameters, blocks {list(cfg.unet_channels)}, 16x16x4 latents, ε-prediction",
        f"- Text encoder: CLIP, hidden {cfg.text_dim}, {cfg.text_layers} layers, vocabulary 49,408, 77 positions "
        f"({sizes['text_encoder'] / 1e6:.2f} M parameters, most of them the unused vocabulary rows); real CLIP BPE tokenizer",
        f"- VAE: AutoencoderKL, factor {VAE_FACTOR}, {sizes['vae'] / 1e6:.2f} M parameters, scaling_factor {state['scaling_factor']:.4f}",
        "- Scheduler: DDIM with SD's schedule (scaled_linear 0.00085 -> 0.012, 1000 steps, steps_offset 1)",
        f"- Classifier (`classifier/`): small CNN with shape, colour and style heads, each with a \"none\" label; "
        f"{_classifier_line(state)} on fresh renders",
        "",
        "## Data",
        f"{cfg.pool_size:,} renders fixed by the seed (`esd.testbed.render`): shapes fill 45-75% of the frame, modest",
        f"position jitter, anti-aliased; fills: solid ({cfg.p_solid:.0%}), else {', '.join(STYLES)} equally often.",
        f'Captions (`esd.testbed.captions`): "" ({cfg.p_empty:.0%}, for classifier-free guidance), else shape and colour',
        f"each named with probability {cfg.p_name:.0%} and a non-solid style always, in varied phrasings",
        '("circle", "a circle", "red circle", "a red circle", "circle, red", "a red circle, striped", "striped").',
        "",
        "## Training",
        "```",
        command,
        "```",
        f"- seed {state['seed']}, device {state['device']}, VAE {state['vae_step']} steps (batch {cfg.vae_batch_size}), "
        f"diffusion {state['step']} steps (batch {cfg.batch_size}, AdamW lr {cfg.lr}, EMA {cfg.ema_decay})",
        f"- text encoder trained jointly with a concept-separation penalty (weight {cfg.distinct_weight}: mean squared "
        "cosine between different concept words' outputs, `esd.testbed.text`)",
        f"- wall time {state['elapsed_s'] / 60:.1f} min"
        + (f"; {state['s_per_step']:.3f} s per diffusion step on {state['device']}" if "s_per_step" in state else ""),
        f"- settings: `{json.dumps({k: v for k, v in asdict(cfg).items() if k != 'extra'})}`",
    ]
    if cfg.warm_start:
        lines.append(f"- warm start: VAE, text encoder and UNet started from `{cfg.warm_start}` (the first testbed)")
    lines += [f"- {k}: {v}" for k, v in cfg.extra.items()]
    if similarity is not None:
        lines += [
            "",
            "## How far apart the text encoder keeps concept words",
            "Cosine similarity of the encoder's outputs between different concept words (`esd.testbed.text."
            "similarity_report`): at the word's own token, bare and in \"a {colour} {shape}, {style}\" contexts;",
            "same kind = e.g. circle vs square in otherwise equal prompts; EOS = end-of-text token of the bare words and \"\".",
            "",
            "| pairs | mean | max |",
            "| --- | --- | --- |",
        ]
        for key, name in (("word", "concept tokens, all pairs"), ("same_kind", "concept tokens, same kind"),
                          ("eos", "end-of-text tokens")):
            lines.append(f"| {name} | {similarity[f'{key}_mean']:.3f} | {similarity[f'{key}_max']:.3f} |")
    if metrics is not None:
        lines += quality_lines(metrics)
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")


def _classifier_line(state: dict) -> str:
    """Per-head accuracy of the classifier, as `finish` records it from the classifier's config.json."""
    acc = state.get("classifier_accuracy", {})
    return ", ".join(f"{k} {acc[f'{k}_accuracy']:.1%}" for k in ("shape", "colour", "style") if f"{k}_accuracy" in acc)


def quality_lines(metrics: dict) -> list[str]:
    """The model card's quality section: accuracy per phrasing and per concept."""
    lines = [
        "",
        "## Measured quality",
        f"Every prompt of the testbed evaluation ({len(metrics['per_prompt'])} prompts in {len(metrics['by_phrasing'])} "
        f"phrasings) x {metrics['seeds_per_prompt']} seeds, DDIM {metrics['steps']} steps, guidance "
        f"{metrics['guidance']}, judged by the shipped classifier (`esd testbed eval`, see `eval/metrics.json`, "
        "`eval/grid.png`). A prompt is judged on what it names; one naming no style must draw the solid fill.",
        "",
        f"- prompted shape found: **{metrics['shape_accuracy']:.1%}**; colour: **{metrics['colour_accuracy']:.1%}**; "
        f"style: **{metrics['style_accuracy']:.1%}**",
        "",
        "| phrasing | shape | colour | style |",
        "| --- | --- | --- | --- |",
    ]
    for name, acc in metrics["by_phrasing"].items():
        cells = [f"{acc[k]:.1%}" if k in acc else "—" for k in ("shape", "colour", "style")]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += ["", "| concept | accuracy |", "| --- | --- |"]
    lines += [f"| {k} | {v:.1%} |" for k, v in metrics["per_concept"].items()]
    return lines
