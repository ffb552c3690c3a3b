"""Image generation for `esd generate`, erase previews, evaluation suites, the testbed and the app.

`generate` is the one generator: several prompts and seeds per UNet call, each image from its own CPU
generator, so an image depends only on its (prompt, seed), not on the batch it was made in.

Prompt CSVs follow the ESD evaluation format: columns `case_number, prompt, evaluation_seed` and an
optional `evaluation_guidance`. Images are written as `{case_number}_{k}.png`, k = 0..num_images-1;
image k of a row uses the generator seeded with `evaluation_seed + k`, so one image can be
regenerated alone and interrupted runs resume without changing any image.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from esd.errors import EsdError

REQUIRED_COLUMNS = ("case_number", "prompt", "evaluation_seed")
DEFAULT_GUIDANCE = 7.5
DEFAULT_STEPS = 50


@dataclass
class PromptRow:
    case_number: str
    prompt: str
    seed: int
    guidance: float | None = None


def read_prompts(path: str | Path) -> list[PromptRow]:
    """Read an ESD prompt CSV; errors name the file and the missing columns or bad row."""
    path = Path(path)
    if not path.is_file():
        raise EsdError(f"--prompts {path}: no such file")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise EsdError(f"--prompts {path}: missing column(s) {', '.join(missing)}; "
                           f"an ESD prompt CSV has {', '.join(REQUIRED_COLUMNS)} [, evaluation_guidance]")
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                guidance = row.get("evaluation_guidance")
                rows.append(PromptRow(str(row["case_number"]).strip(), row["prompt"] or "",
                                      int(float(row["evaluation_seed"])),
                                      float(guidance) if guidance not in (None, "") else None))
            except (TypeError, ValueError) as err:
                raise EsdError(f"--prompts {path}, line {line}: {err}") from err
    if not rows:
        raise EsdError(f"--prompts {path}: no prompts in the file")
    return rows


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = DEFAULT_STEPS,
             guidance: float = DEFAULT_GUIDANCE, size: int | None = None, batch_size: int = 8,
             progress: bool = False) -> list[Image.Image]:
    """One image per (prompts[i], seeds[i]), `batch_size` per pipeline call; each image has its own CPU
    generator seeded with its seed, so batching and the device do not change which noise it starts from."""
    images: list[Image.Image] = []
    with tqdm(total=len(prompts), desc="images", unit="image", disable=not progress, leave=False) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = slice(start, start + batch_size)
            generators = [torch.Generator().manual_seed(int(s)) for s in seeds[chunk]]
            images += pipe(prompt=prompts[chunk], generator=generators, num_inference_steps=steps,
                           guidance_scale=guidance, height=size, width=size).images
            bar.update(len(generators))
    return images


def generate_product(pipe, prompts: list[str], seeds: list[int], steps: int = DEFAULT_STEPS,
                     guidance: float = DEFAULT_GUIDANCE, size: int | None = None, batch_size: int = 8,
                     progress: bool = False) -> list[Image.Image]:
    """Every prompt with every seed, prompt-major: image i * len(seeds) + j is (prompts[i], seeds[j])."""
    jobs = [(p, s) for p in prompts for s in seeds]
    return generate(pipe, [p for p, _ in jobs], [s for _, s in jobs], steps, guidance, size, batch_size, progress)


def generate_rows(pipe, rows: list[PromptRow], output: str | Path, num_images: int = 1,
                  steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, size: int | None = None,
                  progress: bool = True) -> list[Path]:
    """Write `{case_number}_{k}.png` for every row; images already on disk are kept, not redone."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = {(row.case_number, k): output / f"{row.case_number}_{k}.png" for row in rows for k in range(num_images)}
    for row in tqdm(rows, desc="generate", disable=not progress):
        todo = [k for k in range(num_images) if not paths[row.case_number, k].exists()]
        if not todo:
            continue
        images = generate(pipe, [row.prompt] * len(todo), [row.seed + k for k in todo], steps,
                          row.guidance if row.guidance is not None else guidance, size)
        for k, image in zip(todo, images, strict=True):
            tmp = paths[row.case_number, k].with_suffix(".tmp.png")
            image.save(tmp)
            tmp.replace(paths[row.case_number, k])  # a killed run never leaves a half-written png behind
    return list(paths.values())
