"""Loading base models and asking them what they are.

A base model is a Hugging Face id, a diffusers pipeline folder, or a CompVis single file
(`.ckpt`/`.safetensors`, see `esd.compvis`). Which family it is (SD1.x, SD2.x, SDXL), what its UNet
predicts, its native image size and the prompt encoding all live here. ESD weight files are in
`esd.weights`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from esd.errors import EsdError
from esd.networks import TRANSFORMER_FAMILIES, Cond, network
from esd.sampling import is_flow
from esd.shipped import check_testbed, testbed_path

# re-exported for esd.erase, esd.testbed.cli and tests/test_testbed*.py; import from esd.weights
from esd.weights import apply_esd_weights, save_esd_weights  # noqa: F401

# models/testbed/ in a checkout, the copy inside an installed wheel, or $ESD_TESTBED (esd.shipped).
TESTBED = testbed_path()
SINGLE_FILE_SUFFIXES = {".ckpt", ".safetensors", ".pt", ".pth", ".bin"}
GENERIC_GRID_PROMPTS = ["a photo of a dog", "a city street at night", "a bowl of fruit on a wooden table"]


def resolve_device(name: str = "auto", flag: str = "--device") -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU; a bare index like '1' means cuda:1. `flag`: the flag the name came
    from (--devices' first device), named in errors."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    given = name
    if name.isdigit():
        name = f"cuda:{name}"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise EsdError(f"{flag} {given!r} is not a torch device (use auto, cpu, cuda, cuda:1, mps)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        fix = "leave --devices out (one device)" if flag == "--devices" else "use --device cpu"
        raise EsdError(f"{flag}: {given} needs CUDA, which this machine does not have; {fix}")
    return device


def looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~")) and "\\" not in model


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    # float32 is what from_pretrained gives anyway; only name other dtypes (the keyword was renamed
    # from torch_dtype to dtype in recent diffusers, and the old name now warns).
    return {} if dtype == torch.float32 else {"torch_dtype": dtype}


def _without_safety_checker(index: dict) -> dict:
    # Only SD1.x/SD2.x pipelines have the component; passing it to SDXL makes diffusers warn.
    return {"safety_checker": None} if "safety_checker" in index else {}


def load_pipeline(model: str | None = None, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  config: str | None = None):
    """Load a base pipeline (default: the shipped testbed) with a DDIM scheduler, progress bars off.

    `config` only matters for CompVis single files: an LDM yaml or a diffusers config folder.
    """
    from diffusers import DDIMScheduler, DiffusionPipeline

    if model is None:
        model = str(check_testbed(TESTBED))
    path = Path(model).expanduser()
    if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        from esd import compvis  # single-file support lives with the CompVis conversion

        pipe = compvis.load_single_file(path, config=config, torch_dtype=dtype)
    elif path.is_dir():
        if not (path / "model_index.json").exists():
            hint = " (it looks like a single UNet folder)" if (path / "config.json").exists() else ""
            raise EsdError(f"--model {model}: not a diffusers pipeline folder, no model_index.json{hint}; "
                           "pass the pipeline's root folder or a CompVis .ckpt/.safetensors file")
        index = json.loads((path / "model_index.json").read_text())
        pipe = DiffusionPipeline.from_pretrained(str(path), **_without_safety_checker(index), **_dtype_kwargs(dtype))
    elif path.exists():
        raise EsdError(f"--model {model}: a file of unknown type; expected a diffusers folder or "
                       f"a CompVis file ending in {', '.join(sorted(SINGLE_FILE_SUFFIXES))}")
    elif looks_like_hub_id(model):
        try:
            index = DiffusionPipeline.load_config(model)  # model_index.json only
            pipe = DiffusionPipeline.from_pretrained(model, **_without_safety_checker(index), **_dtype_kwargs(dtype))
        except OSError as err:
            raise EsdError(f"--model {model}: could not load it from the Hugging Face hub ({err}). "
                           "Offline? Download it on a connected machine and pass the local folder.") from err
    else:
        raise EsdError(f"--model {model}: no such file or folder")
    if not is_flow(pipe.scheduler):  # flow-matching families (SD3, FLUX) keep their own Euler scheduler
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    pipe.esd_source = model  # where it came from, for metadata and model cards
    return pipe


def sd_scheduler():
    """SD's own DDIM noise schedule (scaled-linear betas 0.00085..0.012 over 1000 steps, ε-prediction).

    Plain DDIM from pure noise works with it (docs/design.md, "The testbed", noise schedule).
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        num_train_timesteps=1000,
    )


def sd_pipeline(vae, text_encoder, unet, scheduler=None, tokenizer=None):
    """An SD1.x/SD2.x `StableDiffusionPipeline` from its parts: no safety checker, progress bars off.

    The one place that assembles one (the tiny test models, testbed training, benchmarks); the scheduler
    defaults to `sd_scheduler()`, the tokenizer to the shipped CLIP one.
    """
    from diffusers import StableDiffusionPipeline

    from esd.tokenizer import clip_tokenizer

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer() if tokenizer is None else tokenizer,
        unet=unet,
        scheduler=sd_scheduler() if scheduler is None else scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None and hasattr(pipe, "_get_add_time_ids")


FAMILY_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sd3": "SD3/SD3.5", "flux": "FLUX.1",
                 "flux2": "FLUX.2"}
PREDICTION_LABELS = {"epsilon": "ε-prediction", "v_prediction": "v-prediction", "sample": "x0-prediction",
                     "flow": "flow matching (velocity)"}


def model_family(pipe) -> str:
    """'sd1' | 'sd2' | 'sdxl' | 'sd3' | 'flux', from the pipeline's components (the same for folders, hub ids
    and CompVis files).

    SD3 and FLUX: their transformer's class. SDXL: two text encoders and size ids. SD2.x: an OpenCLIP text
    tower, which diffusers runs as a CLIPTextModel with plain GELU (OpenAI's CLIP, SD1.x, uses quick-GELU),
    1024 wide in the real model.
    """
    family = TRANSFORMER_FAMILIES.get(type(network(pipe)).__name__)
    if family is not None:
        return family
    if is_sdxl(pipe):
        return "sdxl"
    text = pipe.text_encoder.config
    if getattr(text, "hidden_act", "") == "gelu" or pipe.unet.config.cross_attention_dim == 1024:
        return "sd2"
    return "sd1"


def prediction_type(pipe) -> str:
    """What the network outputs: 'epsilon', 'v_prediction' (SD2.x 768-v), 'sample', or 'flow' (SD3, FLUX: the
    velocity ε − x_0); ESD trains it as it is."""
    if is_flow(pipe.scheduler):
        return "flow"
    return str(pipe.scheduler.config.get("prediction_type", "epsilon"))


def describe_model(pipe, image_size: int | None = None) -> str:
    """One line for the console and the model card, e.g. 'SDXL (StableDiffusionXLPipeline), ε-prediction, 1024 px'."""
    size = image_size or default_image_size(pipe)
    kind = prediction_type(pipe)
    return (f"{FAMILY_LABELS[model_family(pipe)]} ({type(pipe).__name__}), "
            f"{PREDICTION_LABELS.get(kind, kind)}, {size} px")


def default_image_size(pipe) -> int:
    """The side the model was trained at: the network's sample size times the VAE's downsampling factor
    (FLUX's transformer has none: its pipeline's default, 128 latents, 1024 px)."""
    sample_size = getattr(network(pipe).config, "sample_size", None) or getattr(pipe, "default_sample_size", 128)
    return int(sample_size) * int(pipe.vae_scale_factor)


def flux_guidance_distilled(pipe) -> bool:
    """FLUX.1-dev and FLUX.2-dev take the guidance scale as an input instead of running two predictions."""
    return model_family(pipe) in ("flux", "flux2") and bool(network(pipe).config.guidance_embeds)


def samples_without_cfg(pipe) -> bool:
    """Whether the pipeline samples with one prediction per step, without classifier-free guidance: FLUX.1 (dev
    takes the scale as an input, schnell was step-distilled; FluxPipeline's true CFG is off by default),
    FLUX.2-dev (a guidance input) and the step-distilled FLUX.2 klein. The klein base model runs true CFG
    with "" as the negative prompt, as SD3 does."""
    family = model_family(pipe)
    if family == "flux":
        return True
    return family == "flux2" and (flux_guidance_distilled(pipe) or bool(pipe.config.get("is_distilled", False)))


def model_notes(pipe) -> dict:
    """The pipeline's model folder's `esd.json` (grid prompts, concept kinds, which recipe each kind gets;
    `esd.recipes`), or {} when it has none."""
    from esd import recipes

    source = Path(getattr(pipe, "esd_source", "") or "")
    return recipes.model_notes(source if source.is_dir() else None)


TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def move_text_encoders(pipe, device: torch.device | str) -> None:
    """Put the pipeline's text encoders on `device`. ESD encodes its prompts once, at the start: on a GPU the
    encoders then wait on the CPU (FLUX's and SD3's T5 alone is 9 GB in bf16), and come back for the grids."""
    for part in TEXT_ENCODERS:
        if getattr(pipe, part, None) is not None:
            getattr(pipe, part).to(device)


@contextlib.contextmanager
def text_encoders_on(pipe, device: torch.device | str):
    """The text encoders on `device` inside the block (to generate), where they were after it."""
    before = next((getattr(pipe, p).device for p in TEXT_ENCODERS if getattr(pipe, p, None) is not None), None)
    move_text_encoders(pipe, device)
    try:
        yield
    finally:
        if before is not None:
            move_text_encoders(pipe, before)


def grid_prompts(pipe) -> list[str]:
    """Unrelated prompts for before/after grids: the model folder's own, or generic ones."""
    return list(model_notes(pipe).get("grid_prompts", GENERIC_GRID_PROMPTS))


@torch.no_grad()
def encode_prompt(pipe, text: str, image_size: int | None = None, guidance: float | None = None) -> Cond:
    """Text conditioning of one prompt through the pipeline's own encoder(s).

    SD3: the joint CLIP-L + CLIP-G (+ T5) sequence and the pooled CLIP vector; "" is its unconditional input, as
    its pipeline's negative prompt. FLUX: the T5 sequence and pooled CLIP-L vector, plus `guidance` (the
    guidance scale FLUX.1-dev takes as an input; for it ε*(x, ∅) is "" at the same guidance, a prediction the
    model can make, where true classifier-free guidance was distilled away). FLUX.2: the text encoder's stacked
    hidden states (no pooled vector), plus `guidance` where the checkpoint takes it (FLUX.2-dev; klein does not).
    """
    device = network(pipe).device
    family = model_family(pipe)
    if family == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(text, None, None, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return Cond(embeds, {"pooled_projections": pooled})
    if family == "flux2":  # one sequence (stacked hidden states of the Qwen3 / Mistral encoder), no pooled vector
        embeds, _ = pipe.encode_prompt(text, device=device, num_images_per_prompt=1)
        added = {}
        if flux_guidance_distilled(pipe):
            added["guidance"] = torch.full((1,), 4.0 if guidance is None else guidance, device=device)
        return Cond(embeds, added)
    if family == "flux":
        embeds, pooled, _ = pipe.encode_prompt(text, None, device=device, num_images_per_prompt=1)
        added = {"pooled_projections": pooled}
        if flux_guidance_distilled(pipe):
            added["guidance"] = torch.full((1,), 3.5 if guidance is None else guidance, device=device)
        return Cond(embeds, added)
    if is_sdxl(pipe):
        embeds, _, pooled, _ = pipe.encode_prompt(text, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        if not text and pipe.config.get("force_zeros_for_empty_prompt", False):
            # SDXL-base's unconditional input is all zeros (its pipeline's own CFG branch and its training
            # dropout), not the encoded "": ε*(x_t, t) must be the prediction the model samples with.
            embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        size = image_size or default_image_size(pipe)
        time_ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=embeds.dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        return Cond(embeds, {"text_embeds": pooled, "time_ids": time_ids.to(device)})
    embeds, _ = pipe.encode_prompt(text, device, 1, do_classifier_free_guidance=False)
    return Cond(embeds)
