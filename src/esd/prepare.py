"""The networks of an erase, prepared: θ selected, ε* built beside it, the frozen part cast and placed.

`--precision` decides the frozen weights' dtype (`auto_precision` for the default); θ and Adam's state stay fp32
(docs/design.md, "Mixed precision").
"""

from __future__ import annotations

import contextlib

import torch

from esd.config import EraseConfig
from esd.frozen import copied_denoiser, original_values, swapped_denoiser
from esd.lora import add_lora
from esd.models import resolve_device
from esd.networks import TRANSFORMER_FAMILIES
from esd.params import select_parameters
from esd.sampling import unet_denoiser

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def auto_precision(family: str) -> str:
    """`--precision auto`: the frozen weights' dtype for a model family.

    SD3/SD3.5 and FLUX.1/FLUX.2 are run in bf16 by their makers (and by diffusers' examples): fp32 would double the
    frozen weights' memory without adding precision they were trained to use. SD1.x/SD2.x/SDXL keep fp32, the
    paper's setting.
    """
    return "bf16" if family in TRANSFORMER_FAMILIES.values() else "fp32"


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
    if cfg.gradient_checkpointing:  # only the one grad forward per iteration pays for it
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    return params, unet_denoiser(unet), frozen


def autocast(cfg: EraseConfig, device: torch.device):
    """Forwards in the frozen weights' precision (a no-op in fp32)."""
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[cfg.precision])
