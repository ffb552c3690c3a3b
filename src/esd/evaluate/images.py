"""Generated image sets on disk: which image belongs to which prompt and seed, and with which model.

Each set lives in its own folder (`DIR/images/model`, `DIR/images/reference`) beside a `manifest.json`
that lists every image with its prompt and seed and records how the images were made. A re-run finds
the images and evaluates them without loading the diffusion model; an interrupted run generates only
the missing ones; a folder made by another model or other settings is refused rather than mixed in.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from esd.errors import EsdError
from esd.evaluate.generate import PromptRow
from esd.weights import atomic_path

MANIFEST = "manifest.json"
# Settings that change the images: a manifest that differs in one of them belongs to another run.
IDENTITY_KEYS = ("model", "weights_sha256", "steps", "guidance", "image_size")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def image_records(rows: list[PromptRow], num_images: int, labels: dict[str, str] | None = None) -> list[dict]:
    """One record per image: file name `{case_number}_{k}.png`, prompt, seed (row seed + k), label."""
    records = []
    for row in rows:
        for k in range(num_images):
            record = {"file": f"{row.case_number}_{k}.png", "case_number": row.case_number,
                      "prompt": row.prompt, "seed": row.seed + k, "k": k}
            if row.guidance is not None:
                record["guidance"] = row.guidance  # the row's own scale overrides --guidance
            if labels is not None:
                record["label"] = labels[row.case_number]
            records.append(record)
    return records


def read_manifest(folder: Path) -> dict:
    """The folder's manifest, or an empty one when there is none yet."""
    path = folder / MANIFEST
    if not path.is_file():
        return {"generation": {}, "images": []}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as err:
        raise EsdError(f"{path}: unreadable manifest ({err}); delete it (and the images) to regenerate") from err


def check_manifest(folder: Path, identity: dict, records: list[dict]) -> dict:
    """Refuse a folder whose images were made with another model, settings, prompt or seed; return it."""
    manifest = read_manifest(folder)
    old = manifest.get("generation", {})
    changed = [k for k in IDENTITY_KEYS if k in old and old[k] != identity.get(k)]
    if changed:
        diffs = ", ".join(f"{k}: {old[k]!r} -> {identity.get(k)!r}" for k in changed)
        raise EsdError(f"{folder} holds images made with other settings ({diffs}); "
                       "use another --output, or delete the folder to regenerate")
    before = {r["file"]: r for r in manifest.get("images", [])}
    for record in records:
        was = before.get(record["file"])
        if was is not None and (was.get("prompt"), was.get("seed")) != (record["prompt"], record["seed"]):
            raise EsdError(f"{folder / record['file']} was made for prompt {was.get('prompt')!r}, seed "
                           f"{was.get('seed')}, not {record['prompt']!r}, seed {record['seed']}; use another "
                           "--output for other prompts, or delete the folder to regenerate")
    return manifest


def check_readable(paths: list[Path]) -> None:
    """Every existing image must open: a corrupt file would otherwise be skipped by resume and scored."""
    for path in paths:
        if path.exists():
            try:
                with Image.open(path) as image:
                    image.verify()
            except (UnidentifiedImageError, OSError, SyntaxError) as err:
                raise EsdError(f"{path}: not a readable image ({err}); delete it and re-run to regenerate it") from err


def write_manifest(folder: Path, identity: dict, records: list[dict]) -> Path:
    """Write `manifest.json` atomically: the generation settings and one entry per image."""
    path = folder / MANIFEST
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"generation": identity, "images": records}, indent=2))
    return path


def load_images(paths: list[Path]) -> list[Image.Image]:
    """Open images as RGB; an unreadable one is an error that names it."""
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as err:
            raise EsdError(f"{path}: not a readable image ({err})") from err
    return images


def folder_images(folder: str | Path, flag: str) -> list[Path]:
    """The image files of a user's folder (sorted), checked readable; `flag` names it in errors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EsdError(f"{flag} {folder}: no such folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    check_readable(paths)
    return paths
