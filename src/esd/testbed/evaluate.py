"""Measure a testbed pipeline: every "a {colour} {shape}" prompt x fixed seeds, judged by the classifier.

Efficacy of an erasure is `erased_rate` (share of the erased concept's prompts whose images still show
it; lower is better); specificity is `others_mean_accuracy` (mean accuracy of the other concepts of the
same kind: the other shapes when a shape is erased; higher is better).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from esd.errors import EsdError
from esd.testbed import DEFAULT_TESTBED
from esd.testbed.classifier import load_classifier
from esd.testbed.render import COLOURS, SHAPES


def testbed_prompts() -> list[tuple[str, str, str]]:
    """(prompt, shape, colour) for every shape x colour, shapes outermost."""
    return [(f"a {c} {s}", s, c) for s in SHAPES for c in COLOURS]


def check_concept(erased: str | None) -> str | None:
    """The erased concept as a testbed word, or a concise error naming the valid words."""
    if erased is None:
        return None
    word = erased.strip().lower()
    if word not in SHAPES + COLOURS:
        raise EsdError(f"unknown testbed concept {erased!r}; valid words: {', '.join(SHAPES + COLOURS)}")
    return word


def find_classifier(pipe: StableDiffusionPipeline, classifier_path: str | Path | None) -> Path:
    """The classifier folder: the given one, else `<model folder>/classifier`, else the shipped testbed's."""
    if classifier_path is not None:
        return Path(classifier_path)
    candidates = [DEFAULT_TESTBED / "classifier"]
    name = getattr(pipe, "name_or_path", None)
    if name:
        candidates.insert(0, Path(name) / "classifier")
    return next((c for c in candidates if (c / "config.json").is_file()), candidates[0])


@torch.no_grad()
def generate(
    pipe: StableDiffusionPipeline, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch_size: int
) -> list[Image.Image]:
    """One image per (prompt, seed), prompt-major; the seed fixes the initial noise whatever the batch."""
    jobs = [(p, s) for p in prompts for s in seeds]
    images = []
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i : i + batch_size]
        gens = [torch.Generator().manual_seed(s) for _, s in chunk]  # CPU generators: same noise on every device
        out = pipe([p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance, generator=gens)
        images += out.images
    return images


def concept_accuracy(per_prompt: dict[str, dict], kind: str, word: str) -> float:
    """Share of images of prompts naming `word` (a shape or a colour) where the classifier finds it."""
    rows = [r for r in per_prompt.values() if r[kind] == word]
    hits = sum(r[f"{kind}_hits"] for r in rows)
    return hits / sum(r["n"] for r in rows)


def evaluate_testbed(
    pipe: StableDiffusionPipeline,
    output_dir: str | Path,
    erased: str | None,
    seeds_per_prompt: int = 16,
    steps: int = 50,
    guidance: float = 7.5,
    classifier_path: str | Path | None = None,
    batch_size: int = 64,
) -> dict:
    """Generate, classify and write `metrics.json` and `grid.png` to `output_dir`; returns the metrics."""
    erased = check_concept(erased)
    if seeds_per_prompt < 1 or steps < 1:
        raise EsdError(f"seeds_per_prompt and steps must be >= 1, got {seeds_per_prompt} and {steps}")
    classifier = load_classifier(find_classifier(pipe, classifier_path), device=str(pipe.device))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)

    prompts = testbed_prompts()
    seeds = list(range(seeds_per_prompt))
    images = generate(pipe, [p for p, _, _ in prompts], seeds, steps, guidance, batch_size)
    preds = classifier.classify(images)

    per_prompt = {}
    for k, (prompt, shape, colour) in enumerate(prompts):
        found = preds[k * seeds_per_prompt : (k + 1) * seeds_per_prompt]
        shape_hits = sum(p.shape == shape for p in found)
        colour_hits = sum(p.colour == colour for p in found)
        per_prompt[prompt] = {
            "shape": shape,
            "colour": colour,
            "n": len(found),
            "shape_hits": shape_hits,
            "colour_hits": colour_hits,
            "shape_accuracy": shape_hits / len(found),
            "colour_accuracy": colour_hits / len(found),
            "found": [[p.shape, p.colour] for p in found],
        }
    per_concept = {s: concept_accuracy(per_prompt, "shape", s) for s in SHAPES}
    per_concept |= {c: concept_accuracy(per_prompt, "colour", c) for c in COLOURS}
    n = len(preds)
    metrics = {
        "erased": erased,
        "seeds_per_prompt": seeds_per_prompt,
        "steps": steps,
        "guidance": guidance,
        "n_images": n,
        "shape_accuracy": sum(r["shape_hits"] for r in per_prompt.values()) / n,
        "colour_accuracy": sum(r["colour_hits"] for r in per_prompt.values()) / n,
        "per_concept": per_concept,
        "per_prompt": per_prompt,
    }
    if erased is not None:
        same_kind = SHAPES if erased in SHAPES else COLOURS
        others = [w for w in same_kind if w != erased]
        metrics["erased_rate"] = per_concept[erased]
        metrics["others_mean_accuracy"] = sum(per_concept[w] for w in others) / len(others)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_grid(images, len(prompts), seeds_per_prompt, out / "grid.png")
    return metrics


def write_grid(images: list[Image.Image], n_prompts: int, per_prompt: int, path: Path, max_cols: int = 8) -> None:
    """Rows are prompts (shapes outermost), columns the first `max_cols` seeds; shown at 2x."""
    cols = min(per_prompt, max_cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, n_prompts * h), "white")
    for r in range(n_prompts):
        for c in range(cols):
            grid.paste(images[r * per_prompt + c], (c * w, r * h))
    grid.resize((2 * grid.width, 2 * grid.height), Image.NEAREST).save(path)
