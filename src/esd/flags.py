"""`argparse` flags generated from a config dataclass's fields (`EraseConfig`, `AttackConfig`): the names, types,
defaults, choices and help of a command's flags can never drift from its config."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from esd.config import EraseConfig


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _arg_type(kind) -> type:
    """The argparse type of an annotation: str for Literal, X for list[X] and for X | None."""
    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        return str
    if origin is list:
        return _arg_type(typing.get_args(kind)[0])
    if origin is not None:  # X | None
        return _arg_type(next(a for a in typing.get_args(kind) if a is not type(None)))
    return kind


def add_config_arguments(parser: argparse.ArgumentParser, cls=EraseConfig, given_only: bool = False,
                         groups: dict[str, tuple[str, ...]] | None = None) -> None:
    """One flag per dataclass field: type from the annotation, help/choices/nargs from the metadata.

    With `given_only`, a flag not given is left out of the namespace (`given_settings` then holds exactly what the
    user typed) and the help states the field's default itself. `groups`: title -> field names, for --help.
    """
    hints = typing.get_type_hints(cls)
    where = {name: parser.add_argument_group(title) for title, names in (groups or {}).items() for name in names}
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        help_text = meta.pop("help", "")
        target = where.get(f.name, parser)
        default = argparse.SUPPRESS if given_only else f.default
        if given_only:
            meta.pop("required", None)  # checked after resolving (esd erase: a recipe file may name the concept)
            if f.default not in (None, "", False) and "(default" not in help_text:
                help_text += f" (default: {f.default})"
        if hints[f.name] is bool or set(typing.get_args(hints[f.name])) == {bool, type(None)}:  # --flag / --no-flag
            target.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
            continue
        kind = meta.pop("type", None) or _arg_type(hints[f.name])  # a field may bring its own parser
        target.add_argument(_flag(f.name), dest=f.name, type=kind, default=default, help=help_text, **meta)


def given_settings(args: argparse.Namespace, cls=EraseConfig) -> dict:
    """The config fields the user set (a parser made with `given_only`): the top layer of `esd.recipes.resolve`."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def config_from_args(args: argparse.Namespace, cls=EraseConfig):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


