"""EraseConfig: the one typed description of an erase run.

The CLI (`esd erase`), the legacy script (`train-scripts/train-esd.py`) and the app are all built from
these fields: their names, types, defaults, choices and help text live here and nowhere else.
Validation lives here too and raises `EsdError` naming the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Literal, get_args

from esd.errors import EsdError
from esd.phrasing import retain_pool

# Parameter sets (docs/design.md, "Parameter sets"). Aliases are the names the paper and the 2025 code use.
Method = Literal["xattn", "noxattn", "selfattn", "full", "notime", "xlayer", "selflayer", "x-strict"]
METHOD_ALIASES = {"esd-x": "xattn", "esd-u": "noxattn", "esd-all": "full", "esd-x-strict": "x-strict"}
METHOD_CHOICES = [*get_args(Method), *METHOD_ALIASES]

# Concept presets of the 2023 code: one of these names as --concept erases the whole list.
PRESETS = {
    "i2p": "hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity, bodily fluids, blood",
    "allartist": "Kelly Mckernan, Thomas Kinkade, Ajin Demi Human, Alena Aenami, Tyler Edlin, Kilian Eng",
    "artifact": (
        "ugly, tiling, poorly drawn hands, poorly drawn feet, poorly drawn face, out of frame, mutation, mutated, "
        "extra limbs, extra legs, extra arms, disfigured, deformed, cross-eye, body out of frame, blurry, bad art, "
        "bad anatomy, blurred, text, watermark, grainy"
    ),
}

ETA_CONVENTION = (
    "paper Eq. 5: target = eps*(x,t,'') - eta * (eps*(x,t,c) - eps*(x,t,'')); eta=1 is the paper's default. "
    "The 2025 official scripts' eta equals this eta + 1."
)


def _opt(help: str, **kw):
    return field(metadata={"help": help, **kw.pop("meta", {})}, **kw)


ADVERSARIES = ("prefix", "word", "inversion")


def adversary_modes(spec: str) -> tuple[str, ...]:
    """--robust-adversary's kinds, in the order they take turns: 'prefix+inversion' -> ('prefix', 'inversion');
    a kind named twice takes two turns in each round ('prefix+inversion+inversion': two slots in three invert);
    'both' is 'prefix+word' (the name it had first)."""
    modes = ("prefix", "word") if spec == "both" else tuple(spec.split("+"))
    unknown = [m for m in modes if m not in ADVERSARIES]
    if unknown or not modes:
        raise EsdError(f"--robust-adversary {spec!r}: {', '.join(map(repr, unknown)) or 'nothing'} is not a kind; "
                       f"give one of {', '.join(ADVERSARIES)}, or several joined by '+' (e.g. prefix+inversion)")
    return modes


# The noisiest 30% of the training timesteps, where an image's layout and concept are decided: the attacks fit
# their embeddings there.
DEFAULT_TIMESTEPS = "700:1000"


def parse_timesteps(text: str, flag: str = "--timesteps", total: int = 1000) -> tuple[int, int]:
    """`LOW:HIGH` -> (low, high), 0 <= low < high <= total."""
    try:
        low, high = (int(x) for x in text.split(":"))
    except ValueError:
        raise EsdError(f"{flag} {text!r}: expected LOW:HIGH, e.g. {DEFAULT_TIMESTEPS}") from None
    if not 0 <= low < high <= total:
        raise EsdError(f"{flag} {text}: need 0 <= LOW < HIGH <= {total}")
    return low, high


def _adversary_arg(text: str) -> str:
    """argparse type of --robust-adversary: an unknown kind fails when the arguments are parsed."""
    try:
        adversary_modes(text)
    except EsdError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


# `esd erase --help` in topics (the field order inside each group is the dataclass's).
HELP_GROUPS = {
    "what to erase": ("concept", "separator", "erase_from", "recipe"),
    "the model": ("model", "config", "image_size", "device", "devices", "precision"),
    "the paper's method (Algorithm 1, Eq. 5)": ("method", "iterations", "lr", "eta", "start_guidance", "ddim_steps",
                                                "seed"),
    "training": ("batch_size", "lr_schedule", "sample_from", "timestep", "lora_rank", "train_text_encoder",
                 "text_encoder_lr", "gradient_checkpointing", "compile", "guidance_batch", "sampler_batch", "trajectory_reuse"),
    "opt-in extensions (phrasings and what to keep)": ("contexts", "retain", "retain_weight", "siblings",
                                                       "start_from_sibling"),
    "robust erasing (--robust)": ("robust", "robust_adversary", "robust_images", "robust_tokens",
                                  "robust_steps", "robust_every", "robust_lr"),
    "outputs and checkpoints": ("output", "grid_prompts", "grid_steps", "save_every", "save_every_seconds",
                                "checkpoints_total_limit", "resume", "overwrite", "save_compvis", "compvis_format",
                                "save_kohya"),
}


@dataclass
class EraseConfig:
    """Everything that defines an erase run; saved in the weights' metadata and the model card."""

    concept: str = _opt("concept to erase, e.g. 'Van Gogh' or 'nudity'; a preset name (i2p, allartist, artifact) "
                        "or several concepts joined by --separator", default="",
                        meta={"required": True})
    recipe: str | None = _opt(
        "a recipe: a name `esd recipes` lists, or a .json file (e.g. the recipe.json an erase writes, to repeat it); "
        "its settings go over the paper's defaults and the flags given go over it (default: the model folder's "
        "recipe for the concept's kind, else paper)", default=None, meta={"metavar": "NAME|FILE"})
    model: str | None = _opt("base model: a Hugging Face id, a diffusers pipeline folder or a CompVis "
                             ".ckpt/.safetensors file (default: the shipped testbed)", default=None)
    config: str | None = _opt("for a CompVis file: its LDM yaml or a diffusers config folder "
                              "(default: detected from the file's tensors); for an SD3/FLUX transformer file: the "
                              "diffusers pipeline (folder or Hugging Face id) its text encoders, VAE and scheduler "
                              "come from", default=None)
    method: str = _opt("which UNet parameters to train: xattn (ESD-x, styles), noxattn (ESD-u, objects/nudity), "
                       "selfattn, full, notime, xlayer, selflayer, x-strict", default="xattn",
                       meta={"choices": METHOD_CHOICES})
    iterations: int = _opt("training iterations", default=1000)
    lr: float = _opt("Adam learning rate", default=1e-5)
    eta: float = _opt("negative guidance eta, " + ETA_CONVENTION, default=1.0)
    start_guidance: float = _opt("classifier-free guidance s used to sample x_t with the concept prompt (FLUX.1-dev: "
                                 "the guidance value it takes as an input)", default=3.0)
    ddim_steps: int = _opt("steps N of the partial sampler (DDIM; flow-matching Euler for SD3/FLUX); x_t is taken "
                           "after a random number of them", default=50)
    timestep: Literal["band", "grid"] = _opt(
        "the training timestep t of x_t at sampler step k: band (uniform in step k's band of the 1000 training "
        "timesteps, the 2023 code) or grid (the sampler's own timestep of step k, the 2025 code)", default="band",
        meta={"choices": ["band", "grid"]})
    seed: int = _opt("random seed (concept draws, DDIM step, noise, grid images)", default=0)
    device: str = _opt("torch device: auto, cpu, cuda, cuda:1, mps", default="auto")
    devices: str | None = _opt("two devices 'A,B' (e.g. 0,1): trained UNet on A, a frozen full copy on B "
                               "(the 2023 layout); default keeps one UNet", default=None)
    separator: str | None = _opt("split --concept into several concepts at this string; each iteration "
                                 "erases one of them at random", default=None)
    erase_from: str | None = _opt("erase the concept only from this context (2025 code): x_t is sampled with it "
                                  "and the trained prediction uses it", default=None)
    contexts: list[str] | None = _opt(
        "opt-in: phrasings to erase the concept in, '{}' standing for it (e.g. '{}' 'a {}' 'a red {}'); each "
        "iteration picks one, and the guidance starts from the phrasing without the concept ('a red') instead of "
        "'', so the other words keep their meaning (default: the concept alone, the paper)", default=None,
        meta={"nargs": "+"})
    retain: list[str] | None = _opt(
        "opt-in: prompts to keep; each iteration also holds the trained model's prediction for one of them to the "
        "frozen model's at the same x_t (prompts naming a concept being erased are skipped)", default=None,
        meta={"nargs": "+"})
    retain_weight: float = _opt("weight of the --retain term against the erase term", default=1.0)
    siblings: list[str] | None = _opt(
        "opt-in: concepts of the erased concept's kind to keep in the same phrasings (e.g. the other colours when "
        "erasing one); half the iterations hold the iteration's phrasing (--contexts; else the bare word) with one of "
        "them instead of a --retain prompt ('red {}' erases 'red circle' and holds 'red square')", default=None,
        meta={"nargs": "+"})
    start_from_sibling: bool = _opt(
        "opt-in, with --siblings: Eq. 5's guidance starts from the phrasing with a sibling in the concept's place "
        "('a red square' for 'a red circle'; one fixed sibling per phrasing) instead of the phrasing without it "
        "('a red', or '' for the bare word). For a model whose unconditional drawing is often the concept itself, "
        "where the paper's push ε*(x,c) − ε*(x,'') vanishes", default=False)
    lora_rank: int | None = _opt("train a rank-R LoRA update of the layers --method selects instead of their weights "
                                 "(big models: SDXL, SD3.5, FLUX); esd.safetensors is then a LoRA file that "
                                 "diffusers' load_lora_weights reads (default: full weights, the paper)",
                                 default=None, meta={"metavar": "R"})
    robust: bool = _opt(
        "opt-in adversarial erasing (AdvUnlearn, Zhang et al. 2024): every --robust-every iterations a few steps of "
        "an inner attack (the code of `esd attack`) find embeddings that bring the concept back on the current "
        "model, placed as --robust-adversary says, and the erase term trains on them too; pair it with --retain "
        "(SD1.x/SD2.x). Without --recipe, a model folder may assign a robust recipe per kind", default=False)
    robust_adversary: str = _opt(
        "--robust: where the inner attack's embeddings go: prefix (--robust-tokens before the prompt, as "
        "UnlearnDiffAtk and AdvUnlearn), word (one embedding in place of the concept's word in its phrasing, at the "
        "example's x_t), inversion (one embedding in the word's place, fitted as textual inversion fits it: to "
        "denoise the original model's images of the concept, --robust-images of them, noised at any timestep; the "
        "erase term then trains at those noised images too), or several joined by '+' taking turns over the "
        "batch, a kind named twice taking two turns (both = prefix+word)", default="prefix+inversion",
        meta={"metavar": "KIND[+KIND]", "type": _adversary_arg})
    robust_images: int = _opt("--robust-adversary inversion: images of the concept the original model makes at "
                              "setup, the inner attack's targets, in turn over --contexts", default=16)
    robust_tokens: int = _opt("--robust: prefix embeddings the inner attack optimises", default=5)
    robust_steps: int = _opt("--robust: inner attack steps per refresh (warm-started from the last prefix)",
                             default=5)
    robust_every: int = _opt("--robust: refresh the adversarial prefix every N iterations", default=1)
    robust_lr: float = _opt("--robust: the inner attack's AdamW learning rate", default=0.01)
    train_text_encoder: bool = _opt(
        "also train the text encoder (its transformer layers; the token and position embeddings stay), as "
        "AdvUnlearn does; esd.safetensors then holds the text-encoder delta under text_encoder.* and generate, "
        "evaluate, attack, convert and the app apply it (SD1.x/SD2.x)", default=False)
    text_encoder_lr: float | None = _opt("--train-text-encoder: the text encoder's Adam learning rate (default: --lr)",
                                         default=None)
    sample_from: Literal["esd", "frozen"] = _opt("which model samples x_t: esd (the one being trained, the "
                                                 "paper) or frozen (the 2025 code)", default="esd",
                                                 meta={"choices": ["esd", "frozen"]})
    batch_size: int = _opt("examples (w, k, z_T) per Adam step, per process (paper: 1)", default=1)
    lr_schedule: Literal["constant", "cosine"] = _opt(
        "learning rate over the run: constant (the paper) or cosine decay to 0, so a run at a large --lr settles "
        "instead of ending mid-oscillation", default="constant", meta={"choices": ["constant", "cosine"]})
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _opt(
        "weights of the frozen part of the network: fp32, or bf16/fp16 (trained parameters and Adam state stay "
        "fp32, forwards run under autocast); auto: bf16 for SD3/FLUX (run in bf16 by their makers; fp32 would "
        "double their memory), fp32 for SD1.x/SD2.x/SDXL (the paper)", default="auto",
        meta={"choices": ["auto", "fp32", "bf16", "fp16"]})
    trajectory_reuse: int = _opt("opt-in speed-up: sample one full DDIM trajectory and draw x_t from it for this many "
                                 "iterations (1: a fresh partial trajectory every iteration, the paper)", default=1)
    guidance_batch: bool = _opt("run the sampler's conditional and unconditional forwards as one batch, and the "
                                "frozen model's predictions of an iteration as one (--no-guidance-batch: one "
                                "forward per prediction, the original cost)", default=True)
    sampler_batch: bool = _opt("run the partial trajectories of an iteration's examples as one batch, each leaving "
                               "at its own step k (--no-sampler-batch: one example after another, the original cost)",
                               default=True)
    gradient_checkpointing: bool | None = _opt(
        "recompute UNet activations in the backward pass: most of the memory of an iteration for about one extra "
        "forward among the ~N/2+3 an iteration runs (default: on only where an estimate of training memory "
        "without it exceeds the device's free memory; the run says which it chose)", default=None)
    compile: bool = _opt("opt-in: torch.compile the denoising network (inductor) at the run's fixed shapes; pays a "
                         "compile of each batch shape up front (minutes on a CPU) for faster iterations on a GPU",
                         default=False)
    image_size: int | None = _opt("image side in pixels (default: the model's own, e.g. 512 for SD1.x)",
                                  default=None)
    save_every: int = _opt("write a checkpoint (OUTPUT/checkpoint-N: θ, Adam and random states, to resume from) and "
                           "esd.safetensors every N iterations (0: off); Ctrl-C and SIGTERM always write one, and a "
                           "finished run removes them", default=100)
    save_every_seconds: float = _opt("also write one when this many seconds have passed since the last, so short "
                                     "and slow runs are covered too (0: off)", default=300.0)
    checkpoints_total_limit: int = _opt("keep the newest N checkpoints, deleting older ones (0: keep all)",
                                        default=2)
    resume: str | None = _opt("go on from a checkpoint even if its settings differ: 'latest' (the highest in "
                              "--output) or a checkpoint-N folder (default: the same command on an --output "
                              "holding a checkpoint resumes it when its settings match, and refuses otherwise)",
                              default=None, meta={"metavar": "latest|PATH"})
    overwrite: bool = _opt("start again in an --output that holds checkpoints, deleting them", default=False)
    save_compvis: bool = _opt("also write the erased model as one CompVis file (for AUTOMATIC1111/ComfyUI); "
                              "a CompVis base keeps all its other tensors", default=False)
    compvis_format: Literal["safetensors", "ckpt"] = _opt("file format of --save-compvis", default="safetensors",
                                                          meta={"choices": ["safetensors", "ckpt"]})
    save_kohya: bool = _opt("also write the LoRA in kohya's layout as esd-kohya.safetensors (AUTOMATIC1111/Forge, "
                            "ComfyUI, kohya's sd-scripts); needs --lora-rank and an SD1.x/SD2.x/SDXL model (a weight "
                            "erase converts afterwards: esd convert OUTPUT/esd.safetensors --to kohya DST "
                            "--extract-lora R)", default=False)
    output: str | None = _opt("output folder (default: outputs/esd-<concept>-<method>)", default=None)
    grid_prompts: list[str] | None = _opt("prompts shown in grid.png below the concept's own rows, to see what "
                                          "else changed (default: the model folder's, or three generic ones)",
                                          default=None, meta={"nargs": "+"})
    grid_steps: int = _opt("sampling steps for the before/after grid (0: no grid)", default=30)

    def __post_init__(self) -> None:
        self.method = METHOD_ALIASES.get(self.method, self.method)

    @property
    def concepts(self) -> list[str]:
        """The list W of concepts: a preset, a separator-split list, or the one concept."""
        text = PRESETS.get(self.concept.strip(), self.concept)
        sep = "," if self.concept.strip() in PRESETS else self.separator
        parts = text.split(sep) if sep else [text]
        return [p.strip() for p in parts if p.strip()]

    def validate(self) -> EraseConfig:
        """Raise EsdError naming the first bad field; return self so calls can chain."""
        if not self.concepts:
            raise EsdError("--concept is empty: give the concept to erase, e.g. --concept 'Van Gogh'")
        if self.method not in get_args(Method):
            raise EsdError(f"--method {self.method!r} is unknown; choose one of {', '.join(METHOD_CHOICES)}")
        for name in ("lr", "eta", "start_guidance"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise EsdError(f"--{name.replace('_', '-')} must be a finite number, got {value!r}")
        if self.lr <= 0:
            raise EsdError(f"--lr must be > 0, got {self.lr}")
        for name, low in (("iterations", 1), ("ddim_steps", 1), ("save_every", 0), ("grid_steps", 0),
                          ("batch_size", 1), ("trajectory_reuse", 1), ("checkpoints_total_limit", 0)):
            if getattr(self, name) < low:
                raise EsdError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        if self.image_size is not None and (self.image_size < 8 or self.image_size % 8):
            raise EsdError(f"--image-size must be a positive multiple of 8, got {self.image_size}")
        if not math.isfinite(self.save_every_seconds) or self.save_every_seconds < 0:
            raise EsdError(f"--save-every-seconds must be a finite number >= 0 (0: off), got {self.save_every_seconds}")
        if self.resume is not None and self.overwrite:
            raise EsdError("--resume and --overwrite both set: go on from a checkpoint, or start again")
        if self.resume is not None and not self.resume.strip():
            raise EsdError("--resume is empty: give 'latest' or a checkpoint folder")
        for name, choices in (("sample_from", ("esd", "frozen")), ("timestep", ("band", "grid")), ("precision", ("auto", "fp32", "bf16", "fp16")),
                              ("lr_schedule", ("constant", "cosine")),
                              ("compvis_format", ("safetensors", "ckpt"))):
            if getattr(self, name) not in choices:
                raise EsdError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, "
                               f"got {getattr(self, name)!r}")
        adversary_modes(self.robust_adversary)  # raises on an unknown kind
        for name in ("robust_tokens", "robust_steps", "robust_every", "robust_images"):
            if getattr(self, name) < 1:
                raise EsdError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not math.isfinite(self.robust_lr) or self.robust_lr <= 0:
            raise EsdError(f"--robust-lr must be a finite number > 0, got {self.robust_lr}")
        if self.text_encoder_lr is not None and not (math.isfinite(self.text_encoder_lr) and self.text_encoder_lr > 0):
            raise EsdError(f"--text-encoder-lr must be a finite number > 0, got {self.text_encoder_lr}")
        if self.train_text_encoder and self.lora_rank is not None:
            raise EsdError("--train-text-encoder trains full text-encoder weights; leave out --lora-rank "
                           "(LoRA covers the denoising network only)")
        if self.save_kohya and self.lora_rank is None:
            raise EsdError("--save-kohya writes a LoRA: add --lora-rank R, or erase the weights and extract a LoRA "
                           "afterwards with `esd convert OUTPUT/esd.safetensors --to kohya DST --extract-lora R`")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise EsdError(f"--lora-rank must be >= 1, got {self.lora_rank}; leave it out to train full weights")
        if not math.isfinite(self.retain_weight) or self.retain_weight < 0:
            raise EsdError(f"--retain-weight must be a finite number >= 0, got {self.retain_weight}")
        for context in self.contexts or []:
            if context.count("{}") != 1:
                raise EsdError(f"--contexts {context!r} must hold '{{}}' exactly once, where the concept goes, "
                               "e.g. 'a red {}'")
        if self.retain and not retain_pool(self.retain, self.concepts):
            raise EsdError(f"every --retain prompt names a concept being erased ({', '.join(self.concepts)}): "
                           "give prompts to keep that do not")
        if self.siblings and not retain_pool(self.siblings, self.concepts):
            raise EsdError(f"every --siblings word names a concept being erased ({', '.join(self.concepts)}): "
                           "give other concepts of the same kind")
        if self.contexts and self.erase_from:
            raise EsdError("--contexts and --erase-from both set where the guidance starts: give one of them")
        if self.erase_from is not None and not self.erase_from.strip():
            raise EsdError("--erase-from is empty: give the context concept or leave the flag out")
        if self.devices is not None and len(self.devices.split(",")) != 2:
            raise EsdError(f"--devices takes two devices like '0,1', got {self.devices!r}")
        return self

    def check_complete(self) -> EraseConfig:
        """What only holds once the recipe's settings are in (it may supply --contexts, --siblings)."""
        if self.start_from_sibling and not retain_pool(self.siblings or [], self.concepts):
            raise EsdError("--start-from-sibling starts the guidance from the phrasing with a --siblings word, and "
                           "neither the flags nor the recipe give one: pass --siblings (e.g. square)")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EraseConfig:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def default_output(self) -> str:
        slug = "".join(ch if ch.isalnum() else "-" for ch in self.concept.lower()).strip("-")[:40] or "concept"
        return f"outputs/esd-{slug}-{self.method}"
