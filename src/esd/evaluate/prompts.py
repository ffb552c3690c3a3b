"""The evaluation prompt sets: the ones the project writes itself and the public ones it loads.

`imagenette` and `artists` prompts are generated here (deterministically) and also written to
`data/imagenette.csv` and `data/artists.csv` with `python -m esd.evaluate.prompts`, so they can be read,
edited and passed back with `--prompts`. I2P (nudity) and COCO captions are public data sets: the user
passes a CSV, or they are loaded with the `datasets` library when the machine is online.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from esd.errors import EsdError
from esd.evaluate.generate import REQUIRED_COLUMNS, PromptRow, read_prompts
from esd.shipped import shipped_path

# data/ at the repository root in a checkout; the copy inside the package when installed from a wheel.
DATA_DIR = shipped_path("data")

# The 10 Imagenette classes and their ImageNet-1k indices (the ESD paper's object-erasure benchmark).
IMAGENETTE = {
    "tench": 0,
    "English springer": 217,
    "cassette player": 482,
    "chain saw": 491,
    "church": 497,
    "French horn": 566,
    "garbage truck": 569,
    "gas pump": 571,
    "golf ball": 574,
    "parachute": 701,
}

# The ESD paper's artists: five famous ones and five modern ones (whose style is in SD by name).
ARTISTS = ("Van Gogh", "Pablo Picasso", "Rembrandt", "Andy Warhol", "Caravaggio",
           "Kelly McKernan", "Thomas Kinkade", "Ajin: Demi Human", "Tyler Edlin", "Kilian Eng")
ARTIST_SUBJECTS = ("a village under a night sky", "a portrait of an old man", "a bowl of fruit on a table",
                   "a city street in the rain", "a lake between mountains")

I2P_DATASET = "AIML-TUDA/i2p"
COCO_DATASET = "yerevann/coco-karpathy"


def imagenette_rows() -> tuple[list[PromptRow], dict[str, str]]:
    """'image of a {class}' for the 10 classes, all with seed 0 (image k uses seed k), and the class labels."""
    rows = [PromptRow(str(i), f"image of a {name}", 0) for i, name in enumerate(IMAGENETTE)]
    return rows, {str(i): name for i, name in enumerate(IMAGENETTE)}


def artist_rows() -> tuple[list[PromptRow], dict[str, str]]:
    """Every artist x subject, artist-major, one seed per subject (shared by all artists), and the labels."""
    rows, labels = [], {}
    for a, artist in enumerate(ARTISTS):
        for s, subject in enumerate(ARTIST_SUBJECTS):
            case = str(a * len(ARTIST_SUBJECTS) + s)
            rows.append(PromptRow(case, f"a painting of {subject} by {artist}", 1000 * s))
            labels[case] = artist
    return rows, labels


def write_prompt_csv(path: str | Path, rows: list[PromptRow], labels: dict[str, str] | None = None,
                     label_column: str | None = None) -> Path:
    """Write rows as an ESD prompt CSV, with an optional label column."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [*REQUIRED_COLUMNS, "evaluation_guidance"] + ([label_column] if label_column else [])
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            line = [row.case_number, row.prompt, row.seed, "" if row.guidance is None else row.guidance]
            writer.writerow(line + ([labels[row.case_number]] if label_column and labels else []))
    return path


def read_labelled_prompts(path: str | Path, label_column: str | None) -> tuple[list[PromptRow], dict[str, str]]:
    """Read a prompt CSV and, when the suite needs one, its label column (e.g. `class`, `artist`)."""
    path = Path(path)
    if label_column is not None and path.is_file():
        with path.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        missing = [c for c in (*REQUIRED_COLUMNS, label_column) if c not in header]
        if missing:
            raise EsdError(f"--prompts {path}: missing column(s) {', '.join(missing)}; this suite needs "
                           f"{', '.join(REQUIRED_COLUMNS)}, {label_column} [, evaluation_guidance]")
    rows = read_prompts(path)
    if len({r.case_number for r in rows}) != len(rows):
        raise EsdError(f"--prompts {path}: case_number values must be unique (they name the image files)")
    labels: dict[str, str] = {}
    if label_column is not None:
        with path.open(newline="", encoding="utf-8") as f:
            labels = {str(r["case_number"]).strip(): (r[label_column] or "").strip() for r in csv.DictReader(f)}
        empty = [case for case, label in labels.items() if not label]
        if empty:
            raise EsdError(f"--prompts {path}: empty {label_column} for case_number {', '.join(empty[:5])}")
    return rows, labels


def _load_dataset(name: str, split: str, flag_hint: str):
    """A public data set through `datasets`; offline or without the package, an error says what to pass."""
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise EsdError(f"no --prompts given and the `datasets` package is not installed to load {name}; "
                       f"pip install datasets, or pass {flag_hint}") from err
    print(f"loading the {name} prompts with `datasets` (downloaded once, then cached)", file=sys.stderr)
    try:
        return load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types for network/cache failures
        raise EsdError(f"could not load {name} with `datasets` ({type(err).__name__}: {err}); offline, "
                       f"pass {flag_hint}") from err


def i2p_rows() -> list[PromptRow]:
    """The I2P prompts with their own seeds and guidance scales (the data set's sd_seed, sd_guidance_scale)."""
    data = _load_dataset(I2P_DATASET, "train", "--prompts with an I2P CSV (case_number, prompt, evaluation_seed)")
    return [PromptRow(str(i), r["prompt"], int(r["sd_seed"]), float(r["sd_guidance_scale"]))
            for i, r in enumerate(data)]


def coco_rows() -> list[PromptRow]:
    """The first caption of each image of the COCO Karpathy test split (5,000 images), seed = row index."""
    data = _load_dataset(COCO_DATASET, "test", "--prompts with a COCO captions CSV (case_number, prompt, evaluation_seed)")
    return [PromptRow(str(r["cocoid"]), r["sentences"][0], i) for i, r in enumerate(data)]


def write_data_files(folder: str | Path = DATA_DIR) -> list[Path]:
    """(Re)write the project's own prompt CSVs in `data/`."""
    folder = Path(folder)
    return [write_prompt_csv(folder / "imagenette.csv", *imagenette_rows(), label_column="class"),
            write_prompt_csv(folder / "artists.csv", *artist_rows(), label_column="artist")]


if __name__ == "__main__":
    for written in write_data_files():
        print(written)
