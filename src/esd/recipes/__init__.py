"""Recipes: named sets of `EraseConfig` settings, and the one place a run's settings are resolved.

A recipe is a small JSON file:

    {"description": "one line", "measured": "what it was measured on", "settings": {field: value, ...}}

Its settings go over `EraseConfig`'s defaults (the paper's), and the flags a user gives go over the recipe.
That is the whole resolution: **paper defaults ← recipe ← flags**. The recipe is either named (`--recipe NAME`
or `--recipe FILE`) or, when none is named, the one the model folder assigns to the concept's kind. A model
folder's `esd.json` may say:

    {"concept_kinds": {"shape": ["circle", ...], ...},
     "recipes": {"default": "testbed", "shape": "testbed-shape", ...},      # kind -> recipe name
     "robust_recipes": {"shape": "testbed-shape-robust", ...}}               # the same with --robust

and ship the recipe files in `<model>/recipes/`. A concept is of a kind when it *is* one of the kind's words
(or, with --separator, every concept is a word of that kind); anything else takes the folder's "default". Names
are looked up in the model folder first, then among the package's own (`paper`, `esd-2025`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from esd.config import EraseConfig
from esd.errors import EsdError
from esd.shipped import testbed_path

PACKAGE_RECIPES = Path(__file__).parent
PAPER = "paper"
# Fields that describe this run rather than the method: a resolved config saved as a recipe leaves them out of the
# comparison with the paper, and `esd recipes show` does not list them as changes.
RUN_FIELDS = ("concept", "model", "config", "device", "devices", "output", "resume", "overwrite", "recipe")


@dataclass
class Recipe:
    name: str
    description: str
    measured: str
    settings: dict
    path: Path | None = None
    methods: tuple[str, ...] = ()  # the methods it was measured (or published) with; default: its own method


@dataclass
class Resolution:
    """A resolved run: the config, the recipe it started from and where each non-paper setting came from."""

    config: EraseConfig
    recipe: Recipe
    chosen_by: str  # "flag" (--recipe), "model folder (shape)", or "default"
    sources: dict[str, str] = field(default_factory=dict)  # field -> "flag" | "recipe NAME"

    def changes(self, run_fields: bool = True) -> dict[str, tuple[object, str]]:
        """Every setting that differs from the paper's default: field -> (value, source). `run_fields=False` leaves
        out what names this run rather than the method (concept, model, output, device, ...)."""
        paper = EraseConfig()
        out = {}
        for f in dataclasses.fields(EraseConfig):
            value = getattr(self.config, f.name)
            if f.name == "recipe" or (not run_fields and f.name in RUN_FIELDS):
                continue
            if value != getattr(paper, f.name):
                out[f.name] = (value, self.sources.get(f.name, "flag"))
        return out

    def lines(self) -> list[str]:
        """What `esd erase` prints before training: the recipe, one line per setting changed from the paper, and a
        warning when the method given is not the one the recipe was measured with."""
        head = f"recipe: {self.recipe.name} ({self.chosen_by}) — {self.recipe.description}"
        rows = self.changes(run_fields=False).items()
        return [head] + [f"  {name} = {brief(value)}    [{source}]" for name, (value, source) in rows] + (
            [warning] if (warning := self.method_warning()) else [])

    def method_warning(self) -> str | None:
        """A recipe is measured with its method: another --method runs its other settings untested."""
        measured = self.recipe.methods
        if measured and self.sources.get("method") == "flag" and self.config.method not in measured:
            return (f"warning: recipe {self.recipe.name} was measured with --method {' or '.join(measured)}; "
                    f"--method {self.config.method} runs its other settings (lr, iterations, ...) unmeasured for it")
        return None


def brief(value) -> str:
    """A setting as one short line: long lists (phrasings, kept prompts) by their first items and their count."""
    if isinstance(value, list) and len(value) > 3:
        return "[" + ", ".join(repr(v) for v in value[:2]) + f", ... ({len(value)} in all)]"
    return repr(value) if isinstance(value, str) else str(value)


def read_recipe(path: Path) -> Recipe:
    """A recipe file, checked: JSON with known fields only. An optional "methods" list names every method the
    recipe was measured or published with (the paper's: ESD-x and ESD-u)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise EsdError(f"recipe {path}: cannot read it ({err})") from err
    except json.JSONDecodeError as err:
        raise EsdError(f"recipe {path}: not valid JSON ({err}); a recipe is "
                       '{"description": ..., "measured": ..., "settings": {field: value}}') from err
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise EsdError(f"recipe {path}: no \"settings\" object; a recipe is "
                       '{"description": ..., "measured": ..., "settings": {field: value}}')
    known = {f.name for f in dataclasses.fields(EraseConfig)}
    unknown = sorted(set(data["settings"]) - known)
    if unknown:
        raise EsdError(f"recipe {path}: unknown settings {unknown}; `esd erase --help` lists the settings")
    methods = tuple(EraseConfig(method=m).method for m in data.get("methods", [data["settings"].get("method", "xattn")]))
    return Recipe(path.stem, str(data.get("description", "")), str(data.get("measured", "")),
                  data["settings"], path, methods)


def model_folder(model: str | None) -> Path | None:
    """The folder whose esd.json and recipes/ apply: the shipped testbed by default, a diffusers folder itself."""
    if model is None:
        return testbed_path()
    path = Path(model)
    return path if path.is_dir() else None


def model_notes(folder: Path | None) -> dict:
    """A model folder's esd.json (empty when it has none)."""
    spec = folder / "esd.json" if folder is not None else None
    if spec is None or not spec.is_file():
        return {}
    try:
        return json.loads(spec.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EsdError(f"{spec}: not valid JSON ({err})") from err


def available(folder: Path | None = None) -> dict[str, Path]:
    """Recipe name -> file: the package's, then the model folder's (which win on a shared name)."""
    found = {p.stem: p for p in sorted(PACKAGE_RECIPES.glob("*.json"))}
    if folder is not None and (folder / "recipes").is_dir():
        found |= {p.stem: p for p in sorted((folder / "recipes").glob("*.json"))}
    return found


def load_recipe(name_or_file: str, folder: Path | None = None) -> Recipe:
    """A recipe by name (model folder's, then the package's) or by path to a .json file."""
    path = Path(name_or_file)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise EsdError(f"--recipe {name_or_file}: no such file")
        return read_recipe(path)
    names = available(folder)
    if name_or_file not in names:
        raise EsdError(f"--recipe {name_or_file!r} is unknown; known: {', '.join(names)} (or a .json file); "
                       "`esd recipes` lists them")
    return read_recipe(names[name_or_file])


def concept_kind(notes: dict, concepts: list[str]) -> str | None:
    """The kind every concept is a word of (`concept_kinds` in esd.json), or None."""
    kinds = {word.strip().lower(): kind for kind, words in notes.get("concept_kinds", {}).items() for word in words}
    found = {kinds.get(c.strip().lower()) for c in concepts}
    return found.pop() if len(found) == 1 and None not in found else None


def chosen_recipe(given: dict, folder: Path | None) -> tuple[Recipe, str]:
    """The recipe a run starts from, and why: named by --recipe, assigned by the model folder, or the paper's."""
    if given.get("recipe"):
        return load_recipe(given["recipe"], folder), "--recipe"
    notes = model_notes(folder)
    concepts = EraseConfig(concept=given.get("concept", ""), separator=given.get("separator")).concepts
    kind = concept_kind(notes, concepts)
    table = notes.get("robust_recipes" if given.get("robust") else "recipes", {})
    name = table.get(kind) if kind else None
    if name is None:
        name, kind = table.get("default") or notes.get("recipes", {}).get("default"), None
    if name is None:
        return load_recipe(PAPER), "the default"
    return load_recipe(name, folder), f"model folder: {kind or 'default'}" + (" --robust" if given.get("robust") else "")


def resolve(given: dict, folder: Path | None | str = "auto") -> Resolution:
    """The run's config from the settings the user gave (`given`: field -> value, only those set).

    `folder`: the model folder whose esd.json and recipes apply ("auto": found from `given["model"]`).
    """
    folder = model_folder(given.get("model")) if folder == "auto" else folder
    recipe, chosen_by = chosen_recipe(given, folder)
    settings = {**recipe.settings, **given, "recipe": given.get("recipe") or recipe.name}
    try:
        cfg = EraseConfig(**settings)
    except TypeError as err:
        raise EsdError(f"unknown setting: {err}") from err
    sources = {k: f"recipe {recipe.name}" for k in recipe.settings} | {k: "flag" for k in given}
    return Resolution(cfg.validate().check_complete(), recipe, chosen_by, sources)


def as_recipe(res: Resolution) -> dict:
    """A resolved run as a recipe file: `esd erase --recipe THIS_FILE --concept ...` reruns it exactly."""
    settings = {k: v for k, (v, _) in res.changes(run_fields=False).items()}
    # Fields left at the paper's value are omitted; the concept and model are named so the run can be repeated.
    run = {k: getattr(res.config, k) for k in ("concept", "model", "config", "separator") if getattr(res.config, k)}
    return {"description": f"the settings of one run, from recipe {res.recipe.name}",
            "measured": "see the model card beside this file", "run": run, "settings": settings | run}


def resolved_as_given(cfg: EraseConfig) -> Resolution:
    """A config built in Python and run as it is (`erase(EraseConfig(...))`): every setting is its caller's."""
    recipe = Recipe(cfg.recipe or "none", "an EraseConfig given whole (no recipe applied)", "", {})
    changed = {f.name for f in dataclasses.fields(EraseConfig)}
    return Resolution(cfg, recipe, "the caller", dict.fromkeys(changed, "config"))
