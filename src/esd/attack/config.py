"""AttackConfig: the one typed description of an attack run (`esd attack`, the app's Attack tab, Python).

`esd attack`'s flags are generated from these fields (`esd.flags`); `esd.attack.command.attack(cfg)` runs one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from esd.attack.unlearndiff import PROJECTIONS
from esd.config import DEFAULT_TIMESTEPS, parse_timesteps
from esd.errors import EsdError
from esd.evaluate.generate import DEFAULT_GUIDANCE, DEFAULT_STEPS

ATTACKS = ("unlearndiff", "textual-inversion")
JUDGED_SUITES = ("testbed", "nudity", "imagenette", "artists")  # the suites with a per-image judge (judges.py)
DEFAULT_BUDGET = {"unlearndiff": {"steps": 40, "lr": 0.01}, "textual-inversion": {"steps": 200, "lr": 5e-3}}


def _opt(help: str, **kw):
    return field(metadata={"help": help, **kw.pop("meta", {})}, **kw)


@dataclass
class AttackConfig:
    """Everything that defines an attack on an erased model; recorded in its run.json and metrics.json."""

    attack: str = _opt("unlearndiff: k prefix tokens per prompt (UnlearnDiffAtk, Zhang et al. 2024); "
                       "textual-inversion: one new token for the concept (Pham et al. 2024)", default="unlearndiff",
                       meta={"choices": list(ATTACKS), "required": True})
    concept: str = _opt("the erased concept, as the suite's judge names it (testbed: a shape, colour or style word)",
                        default="", meta={"required": True})
    weights: str | None = _opt("the erased model's ESD weights file (required)", default=None)
    model: str | None = _opt("base model: HF id, diffusers folder or CompVis file (default: the shipped testbed)",
                             default=None)
    suite: str = _opt("whose judge decides success", default="testbed", meta={"choices": list(JUDGED_SUITES)})
    prompts: int = _opt("attack the first N prompts naming the concept", default=12)
    prompt_file: str | None = _opt("prompt CSV (case_number, prompt, evaluation_seed, and `class` for imagenette, "
                                   "`artist` for artists); default: the suite's own", default=None)
    num_images: int = _opt("images per prompt (targets and judged images), image k with seed evaluation_seed + k",
                           default=4)
    tokens: int = _opt("unlearndiff: prefix tokens optimised per prompt", default=5)
    steps: int | None = _opt("optimisation steps (default: unlearndiff 40 per prompt, textual-inversion 200)",
                             default=None)
    lr: float | None = _opt("learning rate (default: unlearndiff 0.01, AdamW; textual-inversion 0.005, Adam)",
                            default=None)
    timesteps: str = _opt("LOW:HIGH, the training timesteps the attack's denoising loss is drawn from; the default "
                          "is the noisiest 30%%, where an image's layout and concept are decided (0:1000: uniform)",
                          default=DEFAULT_TIMESTEPS)
    projection: Literal["every-step", "end"] = _opt(
        "unlearndiff: forward on the nearest tokens every step (straight-through) or project once at the end",
        default="every-step", meta={"choices": list(PROJECTIONS)})
    exclude_concept: bool = _opt("unlearndiff: never project onto tokens that spell the concept", default=False)
    baseline: bool = _opt("also judge each prompt with the concept's word taken out, the rate an attack that only "
                          "drowns the word out would reach", default=True)
    init_word: str = _opt("textual-inversion: the word the new embedding starts from", default="a")
    batch_size: int = _opt("textual-inversion: images per step", default=4)
    seed: int = _opt("seed of the attack's initial tokens, timesteps and noise", default=0)
    sample_steps: int = _opt("DDIM steps of every generated image", default=DEFAULT_STEPS)
    guidance: float = _opt("CFG scale (a CSV's evaluation_guidance wins)", default=DEFAULT_GUIDANCE)
    output: str | None = _opt("results folder (default: outputs/attack-ATTACK-CONCEPT)", default=None)
    device: str = _opt("torch device: auto, cpu, cuda, cuda:1, mps", default="auto")
    overwrite: bool = _opt("delete an earlier attack's results in --output first", default=False)
    classifier: str | None = _opt("testbed: the classifier folder; imagenette: a local ResNet-50 state dict",
                                  default=None)
    threshold: float = _opt("nudity: NudeNet score threshold", default=0.6)
    clip_model: str = _opt("artists: CLIP model, a HF id or a local transformers folder",
                           default="openai/clip-vit-large-patch14")

    @property
    def timestep_range(self) -> tuple[int, int]:
        return parse_timesteps(self.timesteps)

    def with_budget(self) -> AttackConfig:
        """The config with the attack's default steps and lr filled in where none was given, checked: what can be
        checked before loading a model raises `EsdError` naming the flag."""
        if self.attack not in ATTACKS:
            raise EsdError(f"--attack {self.attack!r} is unknown; choose one of {', '.join(ATTACKS)}")
        if self.weights is None:
            raise EsdError("an attack needs the erased model: pass --weights esd.safetensors (the base model is "
                           "--model)")
        if not self.concept.strip():
            raise EsdError("--concept is empty: give the erased concept, e.g. --concept circle")
        budget = DEFAULT_BUDGET[self.attack]
        cfg = dataclasses.replace(self, steps=budget["steps"] if self.steps is None else self.steps,
                                  lr=budget["lr"] if self.lr is None else self.lr)
        for name in ("prompts", "num_images", "tokens", "steps", "sample_steps", "batch_size"):
            if getattr(cfg, name) < 1:
                raise EsdError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
        if not cfg.lr > 0:
            raise EsdError(f"--lr must be > 0, got {cfg.lr}")
        cfg.timestep_range  # noqa: B018  (raises on a malformed --timesteps)
        return cfg
