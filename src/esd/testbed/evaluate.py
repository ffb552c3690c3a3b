"""Measure a testbed pipeline: every prompt of the testbed's phrasings x fixed seeds, judged by the classifier.

The prompts name some of an image's labels, in the phrasings of the training captions: "a {colour} {shape}",
"a {colour} {shape}, {style}" and every shorter phrasing ("circle", "a circle", "red circle", "circle, red",
"red", "striped", "a circle, striped"). A prompt is judged on what it names; a prompt naming no style is
judged on drawing the plain solid fill.

Efficacy of an erasure is `erased_rate` (share of the images of prompts naming the erased concept that still
show it; lower is better); specificity is the accuracy of every other concept on the prompts that do not name
the erased one ("a red square" for red after erasing circles, not "a red circle"), reported per concept and as
`others_mean_accuracy` / `others_min_accuracy` over the other concepts of the same kind.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from diffusers import StableDiffusionPipeline
from PIL import Image

from esd.errors import EsdError
from esd.evaluate.generate import generate_product
from esd.evaluate.report import save_image
from esd.grids import make_grid
from esd.testbed import DEFAULT_TESTBED
from esd.testbed.captions import phrase
from esd.testbed.classifier import Prediction, load_classifier
from esd.testbed.render import COLOURS, SHAPES, SOLID, STYLES, kind_of

CONCEPTS = SHAPES + COLOURS + STYLES
KIND_WORDS = {"shape": SHAPES, "colour": COLOURS, "style": STYLES}


@dataclass(frozen=True)
class PromptSpec:
    """A prompt and what it names (None: not named; a style that is not named is expected to be solid)."""

    prompt: str
    shape: str | None = None
    colour: str | None = None
    style: str | None = None
    phrasing: str = ""  # the template, e.g. "a {colour} {shape}, {style}"

    def expected(self, kind: str) -> str | None:
        """The label the classifier should find for `kind`, or None if the prompt does not constrain it."""
        if kind == "style":
            return self.style or SOLID
        return getattr(self, kind)


PROMPT_SETS = ("full", "quick", "base")


def testbed_prompts(prompt_set: str = "full") -> list[PromptSpec]:
    """The evaluation prompts. "full": every phrasing (94 prompts); "quick" (34, for sweeps): the 12
    "a {colour} {shape}", each with one style (every style 4 times), and the bare words; "base": the 12."""
    if prompt_set not in PROMPT_SETS:
        raise EsdError(f"unknown testbed prompt set {prompt_set!r}; choose {', '.join(PROMPT_SETS)}")
    if prompt_set == "quick":
        full = testbed_prompts("full")
        base = full[:12]
        styled = [PromptSpec(phrase(p.shape, p.colour, y), p.shape, p.colour, y, "a {colour} {shape}, {style}")
                  for p, y in zip(base, itertools.cycle(STYLES), strict=False)]
        bare = [p for p in full if p.phrasing in ("{shape}", "{colour}", "{style}")]
        return base + styled + bare
    # (shape named?, colour named?, style named?, phrasing variant): the base set first, then the rest.
    layouts = [(1, 1, 0, 0)] if prompt_set == "base" else [
        (1, 1, 0, 0), (1, 1, 1, 0), (1, 0, 0, 0), (1, 0, 0, 1), (1, 1, 0, 1), (1, 1, 0, 2), (0, 1, 0, 0),
        (0, 0, 1, 0), (1, 0, 1, 0)]
    specs = []
    for has_s, has_c, has_y, v in layouts:
        template = phrase("{shape}" if has_s else None, "{colour}" if has_c else None, "{style}" if has_y else None, v)
        options = (SHAPES if has_s else (None,), COLOURS if has_c else (None,), STYLES if has_y else (None,))
        specs += [PromptSpec(phrase(s, c, y, v), s, c, y, template) for s, c, y in itertools.product(*options)]
    return specs


def check_concept(erased: str | None) -> str | None:
    """The erased concept as a testbed word, or a concise error naming the valid words."""
    if erased is None:
        return None
    word = erased.strip().lower()
    try:
        kind_of(word)
    except ValueError:
        raise EsdError(f"unknown testbed concept {erased!r}; valid words: {', '.join(CONCEPTS)}") from None
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


def judge(specs: list[PromptSpec], preds: list[Prediction], per_prompt: int) -> dict[str, dict]:
    """Per prompt: what it names and, for each kind it constrains, how many images show the expected label."""
    rows = {}
    for k, spec in enumerate(specs):
        found = preds[k * per_prompt : (k + 1) * per_prompt]
        expected = {kind: want for kind in KIND_WORDS if (want := spec.expected(kind)) is not None}
        rows[spec.prompt] = scored({**asdict(spec), "expected": expected}, [[p.shape, p.colour, p.style] for p in found])
    return rows


def scored(row: dict, found: list[list[str]]) -> dict:
    """`row` with its images' labels `found` ([shape, colour, style] each, the order of KIND_WORDS) and, for each
    kind it expects, how many images show the expected label."""
    row = {**row, "n": len(found), "found": found}
    for j, kind in enumerate(KIND_WORDS):
        if kind in row["expected"]:
            hits = sum(f[j] == row["expected"][kind] for f in found)
            row[f"{kind}_hits"], row[f"{kind}_accuracy"] = hits, hits / len(found)
    return row


def restrict_seeds(per_prompt: dict[str, dict], indices: list[int]) -> dict[str, dict]:
    """The judgements of only some of each prompt's images (by seed index): what a run with fewer evaluation
    seeds would have measured, since image j of a prompt depends only on its seed. Splitting one run into
    disjoint groups shows how much a smaller protocol's numbers move by the choice of seeds alone."""
    return {prompt: scored(row, [row["found"][i] for i in indices]) for prompt, row in per_prompt.items()}


def names(row: dict, word: str) -> bool:
    """Whether a prompt row names `word` (as its shape, colour or style)."""
    return word in (row["shape"], row["colour"], row["style"])


def concept_accuracy(per_prompt: dict[str, dict], kind: str, word: str, without: str | None = None) -> float | None:
    """Share of images of prompts whose expected `kind` label is `word` where the classifier finds it, over the
    prompts that do not name `without` (the erased word: its prompts measure efficacy, the others specificity);
    None when no prompt qualifies."""
    rows = [r for r in per_prompt.values() if r["expected"].get(kind) == word
            and (without is None or word == without or not names(r, without))]
    n = sum(r["n"] for r in rows)
    return sum(r[f"{kind}_hits"] for r in rows) / n if n else None


def by_phrasing(per_prompt: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Accuracy per kind for each phrasing template ("a {colour} {shape}", "{shape}", ...)."""
    groups: dict[str, list[dict]] = {}
    for r in per_prompt.values():
        groups.setdefault(r["phrasing"] or r["prompt"], []).append(r)
    return {
        name: {kind: sum(r[f"{kind}_hits"] for r in rows) / sum(r["n"] for r in rows)
               for kind in KIND_WORDS if all(f"{kind}_hits" in r for r in rows)}
        for name, rows in groups.items()
    }


def summarise(per_prompt: dict[str, dict], erased: str | None) -> dict:
    """Accuracy per kind and per concept, and for an erased word its rate and the others of its kind."""
    out = {}
    for kind in KIND_WORDS:  # every prompt constrains the style (unnamed: solid), not every one shape or colour
        rows = [r for r in per_prompt.values() if f"{kind}_hits" in r]
        out[f"{kind}_accuracy"] = sum(r[f"{kind}_hits"] for r in rows) / max(1, sum(r["n"] for r in rows))
    out["by_phrasing"] = by_phrasing(per_prompt)
    words = [(kind, w) for kind, ws in KIND_WORDS.items() for w in ws] + [("style", SOLID)]
    per_concept = {w: acc for kind, w in words if (acc := concept_accuracy(per_prompt, kind, w, erased)) is not None}
    out["per_concept"] = per_concept
    if erased is not None:
        if erased not in per_concept:
            raise EsdError(f"no evaluation prompt names {erased!r}; use the full prompt set")
        others = [w for w in KIND_WORDS[kind_of(erased)] if w != erased and w in per_concept]
        out["erased_kind"] = kind_of(erased)
        out["erased_rate"] = per_concept[erased]
        out["others_mean_accuracy"] = sum(per_concept[w] for w in others) / len(others)
        out["others_min_accuracy"] = min(per_concept[w] for w in others)
    return out


def evaluate_testbed(
    pipe: StableDiffusionPipeline,
    output_dir: str | Path,
    erased: str | None,
    seeds_per_prompt: int = 16,
    steps: int = 50,
    guidance: float = 7.5,
    classifier_path: str | Path | None = None,
    batch_size: int = 128,
    prompt_set: str = "full",
    progress: bool = True,
    judged: dict | None = None,
) -> dict:
    """Generate, classify and write `metrics.json` and `grid.png` to `output_dir`; returns the metrics.

    `progress`: a bar over the images (a full evaluation is minutes of CPU; benchmark logs show where it is).
    `judged`: what was evaluated (the model, the weights file and its sha256), recorded first in metrics.json."""
    erased = check_concept(erased)
    if seeds_per_prompt < 1 or steps < 1:
        raise EsdError(f"seeds_per_prompt and steps must be >= 1, got {seeds_per_prompt} and {steps}")
    classifier = load_classifier(find_classifier(pipe, classifier_path), device=str(pipe.device))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)

    specs = testbed_prompts(prompt_set)
    seeds = list(range(seeds_per_prompt))
    images = generate_product(pipe, [s.prompt for s in specs], seeds, steps, guidance, batch_size=batch_size,
                              progress=progress)
    per_prompt = judge(specs, classifier.classify(images), seeds_per_prompt)
    metrics = {
        "judged": judged or {},
        "erased": erased,
        "prompt_set": prompt_set,
        "seeds_per_prompt": seeds_per_prompt,
        "steps": steps,
        "guidance": guidance,
        "n_images": len(images),
        **summarise(per_prompt, erased),
        "per_prompt": per_prompt,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_grid(images, [s.prompt for s in specs], seeds_per_prompt, out / "grid.png")
    return metrics


def write_grid(images: list[Image.Image], prompts: list[str], per_prompt: int, path: Path, max_cols: int = 8) -> None:
    """Rows are prompts, labelled on the left; columns the first `max_cols` seeds, labelled on top; shown at 2x."""
    cols = min(per_prompt, max_cols)
    cells = [images[r * per_prompt + c] for r in range(len(prompts)) for c in range(cols)]
    grid = make_grid(cells, cols, row_labels=[p[:24] for p in prompts], col_labels=[f"seed {c}" for c in range(cols)],
                     scale=2)
    save_image(grid, path)
