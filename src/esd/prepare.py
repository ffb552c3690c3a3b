"""An erase prepared: θ selected, ε* built beside it, the frozen part cast and placed (`prepare_unet`), and
everything the loop needs once, before the first iteration (`Setup`, `setup`).

`--precision` decides the frozen weights' dtype (`auto_precision` for the default); θ and Adam's state stay fp32
(docs/design.md, "Mixed precision").
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from esd.config import EraseConfig
from esd.cost import WorkCounter
from esd.distributed import Dist, device_for, init_from_env
from esd.errors import EsdError
from esd.examples import prompts_needed
from esd.frozen import copied_denoiser, original_values, swapped_denoiser
from esd.kohya import FAMILIES as KOHYA_FAMILIES
from esd.lora import add_lora
from esd.models import (
    default_image_size,
    describe_model,
    encode_prompt,
    load_pipeline,
    model_family,
    move_text_encoders,
    resolve_device,
    samples_without_cfg,
)
from esd.networks import TRANSFORMER_FAMILIES, Cond, network
from esd.recipes import Resolution
from esd.robust import TextConds, text_encoder_params
from esd.sampling import Denoiser, ddim_scheduler, unet_denoiser
from esd.selection import select_parameters

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def auto_precision(family: str) -> str:
    """`--precision auto`: the frozen weights' dtype for a model family.

    SD3/SD3.5 and FLUX.1/FLUX.2 are run in bf16 by their makers (and by diffusers' examples): fp32 would double the
    frozen weights' memory without adding precision they were trained to use. SD1.x/SD2.x/SDXL keep fp32, the
    paper's setting.
    """
    return "bf16" if family in TRANSFORMER_FAMILIES.values() else "fp32"


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), as oneDNN sees it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the probe: read the flags (Linux)
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def precision_note(device: torch.device, precision: str, native: bool) -> str | None:
    """A warning for half precision on a CPU that only emulates it, else None.

    On an AVX2-only CPU (AMD EPYC, 2026-12-07) the testbed UNet's forward took 13x its fp32 time under bf16
    autocast and 8x under fp16 (docs/results.md); issue #36 measured bf16 at 0.61x on a Xeon with AMX."""
    if device.type != "cpu" or precision == "fp32" or (precision == "bf16" and native):
        return None
    return (f"--precision {precision} on a CPU without native {precision} (for bf16: AVX512-BF16/AMX; fp16 is not "
            "probed): PyTorch may emulate it, and the forwards then run several times slower than in fp32; "
            "--precision fp32 is faster where memory allows")


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: the GPU's free memory, or the machine's available RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf: assume memory is short
        return 0


def checkpointing_by_need(cfg: EraseConfig, net: torch.nn.Module, device: torch.device) -> tuple[bool, str]:
    """Gradient checkpointing on only where memory needs it: (on?, the reason in words).

    Without it an iteration holds the activations of the trained forward for the backward. The estimate of
    training memory without it is the network's fp32 size times (4 + batch size): weights and θ's Adam state,
    plus activations that grow with the examples per step (about 3x the fp32 size per example at the model's
    own resolution on SD1.x). Checkpointing costs about one extra forward of an iteration's ~N/2+3.
    """
    if cfg.gradient_checkpointing is not None:
        return cfg.gradient_checkpointing, "as asked"
    need = sum(p.numel() for p in net.parameters()) * 4 * (4 + cfg.batch_size)
    free = free_memory(device)
    on = need > free
    return on, (f"auto: about {need / 2**30:.1f} GiB to train without it, {free / 2**30:.1f} GiB free on "
                f"{device.type}")


def prepare_unet(cfg: EraseConfig, unet, device: torch.device):
    """Select θ, build ε* (one UNet by default), cast the frozen part, move to `device`.

    Returns (θ, ε_θ, ε*). The cast happens before the move, so the device never holds an fp32 copy
    of the frozen weights in bf16/fp16 mode.
    """
    unet.eval()  # eval: no dropout; gradients still flow to θ
    params = add_lora(unet, cfg.method, cfg.lora_rank) if cfg.lora_rank else select_parameters(unet, cfg.method)
    originals = original_values(params)  # taken before any cast
    if cfg.precision != "fp32":  # frozen weights in half precision, θ (and so Adam's state) in fp32
        unet.to(PRECISIONS[cfg.precision])
        for name, p in params.items():
            p.data = originals[name].float()
    unet.to(device)
    # ε* runs entirely in the frozen dtype: its copy of θ's original values is kept in that dtype too.
    originals = {name: value.to(device, PRECISIONS[cfg.precision]) for name, value in originals.items()}
    if cfg.devices:  # the 2023 layout: a full frozen copy, on the second device
        frozen = copied_denoiser(unet, resolve_device(cfg.devices.split(",")[1]))
    else:
        frozen = swapped_denoiser(unet, originals)
    if cfg.gradient_checkpointing:  # only the one grad forward per iteration pays for it (`checkpointing_by_need`)
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    if cfg.compile:  # after every change to the module: a compiled graph sees θ, ε*'s swapped values as inputs
        unet.compile(dynamic=False, backend=COMPILE_BACKEND)
    return params, unet_denoiser(unet), frozen


def autocast(cfg: EraseConfig, device: torch.device):
    """Forwards in the frozen weights' precision (a no-op in fp32)."""
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[cfg.precision])


COMPILE_BACKEND = "inductor"  # --compile's torch.compile backend (tests swap in "aot_eager": no C++ build)
HALF_CHECK_MAX = 200_000_000  # θ up to this many parameters keeps a CPU copy of its start for the card (0.8 GB)


@dataclass
class Setup:
    """Everything the loop needs, prepared once: models, device, scheduler, text conditioning."""

    cfg: EraseConfig  # as run (precision "auto" made concrete)
    pipe: object
    device: torch.device
    dist: Dist
    params: dict[str, torch.nn.Parameter]  # θ
    trained: Denoiser  # ε_θ
    frozen: Denoiser  # ε*
    scheduler: object
    conds: dict[str, Cond]  # text conditioning, once per prompt (the text encoder is frozen)
    size: int  # image side in pixels
    guidance: float  # the sampler's CFG scale: --start-guidance, or 1 where the pipeline samples without CFG (FLUX)
    text: TextConds | None = None  # the encoder as trained (--train-text-encoder) or prefixed (--robust)
    # --robust-adversary inversion: the original model's images of the concept, (concept, phrasing, latent)
    bank: list[tuple[str, str, torch.Tensor]] = field(default_factory=list)

    sampler: Denoiser | None = None  # what samples x_t: ε_θ (the paper) or ε* (--sample-from frozen)
    work: WorkCounter = field(default_factory=WorkCounter)  # images through the network, by part (esd.cost)
    base: dict[str, torch.Tensor] | None = None  # θ before training, on the CPU (weight erases up to HALF_CHECK_MAX)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        side = self.size // self.pipe.vae_scale_factor
        return (1, self.pipe.vae.config.latent_channels, side, side)


def setup(cfg: EraseConfig, pipe=None, progress: bool = True, resolution: Resolution | None = None) -> Setup:
    """Say which settings run and from where, load (or take) the pipeline, select θ, place and cast the models."""
    cfg.validate()
    device = resolve_device(cfg.devices.split(",")[0] if cfg.devices else cfg.device, "--devices" if cfg.devices
                            else "--device")
    d = init_from_env(device.type)
    device = device_for(d, device)
    progress = progress and d.main  # one process speaks
    if progress and resolution is not None:  # before the (slow) load: which recipe, flag or folder chose what
        for line in resolution.lines():
            tqdm.write(line)
    # In bf16/fp16 (and auto, until the family is known) the pipeline is cast on the CPU first: the device never
    # holds it in fp32.
    pipe = pipe if pipe is not None else load_pipeline(cfg.model, "cpu" if cfg.precision != "fp32" else device,
                                                       config=cfg.config)
    cfg.check_complete()
    family = model_family(pipe)
    if cfg.precision == "auto":
        cfg = dataclasses.replace(cfg, precision=auto_precision(family))
    half = cfg.precision != "fp32"
    note = precision_note(device, cfg.precision, native_bf16()) if half else None
    if note and progress:
        tqdm.write(note)
    if cfg.save_compvis and family in TRANSFORMER_FAMILIES.values():
        raise EsdError(f"--save-compvis: no CompVis layout for {family.upper()}; leave the flag out and, for "
                       "ComfyUI, write the erased transformer afterwards with `esd convert MODEL out.safetensors "
                       "--weights OUTPUT/esd.safetensors`")
    if cfg.save_kohya and family not in KOHYA_FAMILIES:
        raise EsdError(f"--save-kohya: kohya's LoRA layout covers SD1.x, SD2.x and SDXL, not {family.upper()}; "
                       "leave the flag out: esd.safetensors is already a LoRA in diffusers' layout")
    if (cfg.robust or cfg.train_text_encoder) and family not in ("sd1", "sd2"):
        flag = "--robust" if cfg.robust else "--train-text-encoder"
        raise EsdError(f"{flag} supports SD1.x/SD2.x pipelines (one CLIP text encoder); this one is {family}")
    on, why = checkpointing_by_need(cfg, network(pipe), device)
    cfg = dataclasses.replace(cfg, gradient_checkpointing=on)  # the config as run says which it chose
    if progress:
        tqdm.write(f"gradient checkpointing: {'on' if on else 'off'} ({why})")
    params, trained, frozen = prepare_unet(cfg, network(pipe), device)
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):  # frozen helpers: weight dtype, on the device
        if getattr(pipe, part, None) is not None:
            trains = part == "text_encoder" and cfg.train_text_encoder  # θ stays fp32
            getattr(pipe, part).to(device, PRECISIONS[cfg.precision] if half and not trains else None)
    if cfg.train_text_encoder:
        params = {**params, **text_encoder_params(pipe.text_encoder)}
    base = None  # θ's values before training, for the card's half-precision figure (esd.lowrank.kept_in)
    if not cfg.lora_rank and sum(p.numel() for p in params.values()) <= HALF_CHECK_MAX:
        base = {name: p.detach().to("cpu", copy=True) for name, p in params.items()}
    size = cfg.image_size or default_image_size(pipe)
    side = size // pipe.vae_scale_factor
    if family in ("flux", "flux2") and side % 2:
        raise EsdError(f"--image-size {size}: FLUX takes 2x2 patches of the latent, so the side must be a multiple "
                       f"of {2 * pipe.vae_scale_factor}")
    one_prediction = samples_without_cfg(pipe)
    if progress:  # say which adapter runs: the family decides text encoding, size ids and the output's meaning
        tqdm.write(f"base model: {describe_model(pipe, size)}")
    conds = {p: encode_prompt(pipe, p, size, guidance=cfg.start_guidance) for p in prompts_needed(cfg)}
    if device.type != "cpu" and not (cfg.robust or cfg.train_text_encoder):  # every prompt is encoded: the text
        move_text_encoders(pipe, "cpu")  # encoders make room for training
    scheduler = ddim_scheduler(pipe.scheduler, cfg.ddim_steps, image_seq_len=(side // 2) ** 2,
                               empirical_mu=family == "flux2")
    guidance = 1.0 if one_prediction else cfg.start_guidance  # x_t as the pipeline samples: FLUX without CFG
    text = TextConds(pipe, cfg.train_text_encoder) if cfg.robust or cfg.train_text_encoder else None
    if cfg.robust and not cfg.retain and progress:
        tqdm.write("--robust without --retain: nothing holds the rest of the model while the adversary pushes the "
                   "erase wider; pass --retain with prompts to keep (AdvUnlearn holds a set of captions)")
    work = WorkCounter()  # each denoiser counts the images it is given, under the part of the iteration it serves
    sampler = work.wrap(trained if cfg.sample_from == "esd" else frozen, "sampler")
    return Setup(cfg=cfg, pipe=pipe, device=device, dist=d, params=params, trained=work.wrap(trained, "trained forward"),
                 frozen=work.wrap(frozen, "frozen targets"), scheduler=scheduler, conds=conds, size=size,
                 guidance=guidance, text=text, sampler=sampler, work=work, base=base)
