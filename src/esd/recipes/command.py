"""`esd recipes` lists the recipes `esd erase --recipe` takes; `esd recipes show NAME` prints one."""

from __future__ import annotations

import argparse
import json

from esd.recipes import PAPER, available, load_recipe, model_folder, model_notes


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "recipes", help="list the erase recipes (named settings), or show one",
        description="Recipes are named sets of `esd erase` settings: the package's (paper, esd-2025) and the model "
        "folder's (the testbed's, one per kind of concept). `esd erase --recipe NAME` takes one; without it, the "
        "model folder's esd.json says which recipe each kind of concept gets.")
    parser.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    parser.add_argument("name", nargs="?", help="show: a recipe name or .json file")
    parser.add_argument("--model", default=None, help="the model folder whose recipes to include "
                                                      "(default: the shipped testbed)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    folder = model_folder(args.model)
    if args.action == "show":
        if not args.name:
            from esd.errors import EsdError

            raise EsdError("esd recipes show needs a NAME (see `esd recipes`)")
        recipe = load_recipe(args.name, folder)
        print(f"{recipe.name}  ({recipe.path})\n{recipe.description}\nmeasured: {recipe.measured}\n")
        print(json.dumps(recipe.settings, indent=2))
        return 0
    names = available(folder)
    notes = model_notes(folder)
    assigned = {}
    for table, suffix in (("recipes", ""), ("robust_recipes", " --robust")):
        for kind, name in notes.get(table, {}).items():
            assigned.setdefault(name, []).append(f"{kind}{suffix}")
    width = max(map(len, names))
    for name, path in names.items():
        recipe = load_recipe(str(path))
        where = f"  [model folder: {', '.join(assigned[name])}]" if name in assigned else (
            "  [without a model folder's]" if name == PAPER else "")
        print(f"{name:<{width}}  {recipe.description.split('. ')[0].rstrip('.')}{where}")
    print("\n`esd recipes show NAME` prints one; `esd erase --recipe NAME` runs it (flags given go over it).")
    return 0
