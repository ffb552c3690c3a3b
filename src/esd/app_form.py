"""The app's erase form, free of Gradio: which EraseConfig fields it shows, and its values back as settings.

A field left blank takes the recipe's value (the recipe chosen, or the model folder's for the concept's kind), as
a flag not given does in `esd erase` (`given_from_form` is the form's `esd.flags.given_settings`); a browser
form must not start a week-long job, so `check_caps` bounds what EraseConfig itself allows.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from esd.config import EraseConfig
from esd.errors import EsdError

# Sane maxima: a browser form must not be able to start a week-long job or a million images.
MAX_ITERATIONS = 5000
MAX_DDIM_STEPS = 200
MAX_SAMPLE_STEPS = 100

# EraseConfig fields shown in the form. A field left blank takes the recipe's value (the recipe chosen, or the model
# folder's for the concept's kind), as a flag not given does in `esd erase`; the rest keep the recipe's too.
FORM_FIELDS = ("concept", "recipe", "method", "iterations", "eta", "start_guidance", "lr", "seed")
ADVANCED_FIELDS = ("ddim_steps", "sample_from", "separator", "erase_from", "grid_steps", "save_every", "robust",
                   "train_text_encoder")
FIELD_CAPS = {"iterations": MAX_ITERATIONS, "ddim_steps": MAX_DDIM_STEPS, "grid_steps": MAX_SAMPLE_STEPS,
              "save_every": MAX_ITERATIONS}


def config_fields(names: tuple[str, ...]) -> list[tuple[str, type, object, str, list | None]]:
    """(name, type, default, help, choices) of EraseConfig fields: the form is built from these."""
    hints = typing.get_type_hints(EraseConfig)
    by_name = {f.name: f for f in dataclasses.fields(EraseConfig)}
    out = []
    for name in names:
        f = by_name[name]
        kind = hints[name]
        if typing.get_origin(kind) is not None and typing.get_origin(kind) is not typing.Literal:  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        choices = f.metadata.get("choices")
        out.append((name, str if choices else kind, f.default, f.metadata.get("help", ""), choices))
    return out


def _coerce(name: str, kind: type, value):
    """A form value as the field's type; blank (empty text, no number, unticked) means "not given": None."""
    if kind is bool:
        return True if value else None  # a box can only add an opt-in; the recipe decides when it is unticked
    if value is None or (isinstance(value, str) and not value.strip()):
        return "" if name == "concept" else None
    if kind is str:
        return str(value)
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise EsdError(f"{name.replace('_', ' ')} must be a number, got {value!r}") from err
    if kind is int:
        if not number.is_integer():
            raise EsdError(f"{name.replace('_', ' ')} must be a whole number, got {value}")
        return int(number)
    return number


def given_from_form(values: dict, output: Path, device: str) -> dict:
    """The settings the form gives (blank fields left out), plus where the run goes and on which device."""
    kinds = {name: kind for name, kind, *_ in config_fields(FORM_FIELDS + ADVANCED_FIELDS)}
    unknown = set(values) - set(kinds)
    if unknown:
        raise EsdError(f"not settable from the app: {', '.join(sorted(unknown))}")
    given = {k: _coerce(k, kinds[k], v) for k, v in values.items()}
    return {k: v for k, v in given.items() if v is not None} | {"output": str(output), "device": device}


def check_caps(cfg: EraseConfig) -> EraseConfig:
    """The app's caps on top of EraseConfig's own rules: a browser form must not start a week-long job."""
    for name, cap in FIELD_CAPS.items():
        if getattr(cfg, name) > cap:
            raise EsdError(f"{name.replace('_', ' ')} is {getattr(cfg, name)}; the app allows at most {cap} "
                           "(use `esd erase` for longer runs)")
    return cfg
