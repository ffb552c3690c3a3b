"""The app's runs: one folder per erase inside the output folder, addressed by name.

A run is a folder holding `esd.safetensors` (and the other files `esd erase` writes). The browser only
ever sends a run's *name*; `resolve_run` turns it into a folder directly inside the output folder and
refuses anything else (paths, `..`, links out), and `run_files` offers only known, real files.
"""

from __future__ import annotations

import time
from pathlib import Path

from esd.config import EraseConfig
from esd.errors import EsdError

RUN_FILES = ("esd.safetensors", "README.md", "recipe.json", "compvis.safetensors", "loss.png", "grid.png")


def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")[:40] or "concept"


def resolve_run(output_dir: Path, name: str) -> Path:
    """The run folder called `name` directly inside `output_dir`; anything else (paths, links out) is refused."""
    root = output_dir.resolve()
    if not name or name != Path(name).name or name in (".", ".."):
        raise EsdError(f"{name!r} is not a run name in {root}")
    run = (root / name).resolve()
    if run.parent != root or not (run / "esd.safetensors").is_file():
        raise EsdError(f"no run {name!r} in {root}")
    return run


def run_files(run: Path) -> list[Path]:
    """The run's downloadable files: known names only, real files inside the run folder (no links out)."""
    files = [run / n for n in RUN_FILES]
    return [p for p in files if p.is_file() and not p.is_symlink() and p.resolve().parent == run.resolve()]


def list_runs(output_dir: Path) -> list[str]:
    """Run folder names (those holding esd.safetensors), newest first."""
    if not output_dir.is_dir():
        return []
    runs = [p for p in output_dir.iterdir()
            if p.is_dir() and not p.is_symlink() and (p / "esd.safetensors").is_file()]
    return [p.name for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]


def run_metadata(run: Path) -> tuple[EraseConfig, dict[str, str]]:
    """A run's EraseConfig and weights metadata, read from the safetensors header only (no tensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(run / "esd.safetensors"), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # a damaged file: say which run
        raise EsdError(f"run {run.name}: esd.safetensors is not readable ({err})") from err
    try:
        cfg = EraseConfig.from_json(meta.get("esd_config", "{}"))
        cfg.concepts  # noqa: B018  (the app shows the concepts: they must be text)
    except (ValueError, TypeError, AttributeError) as err:
        raise EsdError(f"run {run.name}: esd.safetensors holds no readable erase config ({err})") from err
    return cfg, meta


def new_run_dir(output_dir: Path, cfg: EraseConfig) -> Path:
    """Create and return outputs/app/<concept>-<method>-<time>, never an existing folder."""
    stem = f"{slug(cfg.concept)}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = output_dir / stem, 1
    while path.exists():
        n += 1
        path = output_dir / f"{stem}-{n}"
    path.mkdir(parents=True)
    return path
