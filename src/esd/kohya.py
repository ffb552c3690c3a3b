"""kohya's LoRA layout: the files AUTOMATIC1111/Forge, ComfyUI and kohya's sd-scripts exchange.

Each adapted layer is one name — the module's diffusers name with its dots turned to underscores, behind
`lora_unet_` for the UNet (the names sd-scripts writes for SD1.x/SD2.x, and which ComfyUI's
`model_lora_keys_unet` and diffusers' kohya conversion map for SDXL as well) or `lora_te_` for the text
encoder (`lora_te1_`, `lora_te2_` for SDXL's two) —
with three tensors: `.lora_down.weight` (A, r×in), `.lora_up.weight` (B, out×r) and `.alpha`. The update a
client applies is (alpha / r)·B·A; our LoRA runs train at alpha = r (scale 1) and an extracted LoRA has scale 1
too, so alpha is written as the rank and the file means exactly what `esd.safetensors` means.

Within this package a LoRA is `{"unet.<module>": (A, B), "text_encoder.<module>": (A, B)}`, the keys of
diffusers' own LoRA layout (`unet.<module>.lora_A.weight`) without the tensor suffix.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from esd.errors import EsdError

FAMILIES = ("sd1", "sd2", "sdxl")  # the families kohya's LoRA layout (and the clients reading it) covers
BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}  # sd-scripts' ss_base_model_version
ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}
_DIFFUSERS_KEY = re.compile(r"(.+)\.lora_([AB])\.weight")

Lora = dict[str, tuple[Tensor, Tensor]]  # "<part>.<module>" -> (A, B)


def from_diffusers(tensors: dict[str, Tensor]) -> Lora:
    """A diffusers-layout LoRA (`unet.<module>.lora_A.weight`, `.lora_B.weight`) as {part.module: (A, B)}."""
    halves: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        match = _DIFFUSERS_KEY.fullmatch(key)
        if match is None:
            raise EsdError(f"{key!r} is not a LoRA tensor (<part>.<module>.lora_A.weight)")
        halves.setdefault(match[1], {})[match[2]] = value
    lacking = [m for m, ab in halves.items() if set(ab) != {"A", "B"}]
    if lacking:
        raise EsdError(f"LoRA layers without both lora_A and lora_B: {lacking[:3]}")
    return {module: (ab["A"], ab["B"]) for module, ab in halves.items()}


def to_diffusers(lora: Lora) -> dict[str, Tensor]:
    """{part.module: (A, B)} in diffusers' layout, which `pipe.load_lora_weights` reads."""
    out = {}
    for module, (down, up) in lora.items():
        out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = down, up
    return out


def kohya_name(module: str, family: str) -> str:
    """`unet.down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in`."""
    part, name = module.split(".", 1)
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if family == "sdxl" else "lora_te_",
                "text_encoder_2": "lora_te2_"}
    if part not in prefixes:
        raise EsdError(f"kohya's layout has no name for the {part!r} part (only a UNet and CLIP text encoders)")
    return prefixes[part] + name.replace(".", "_")


def check_family(family: str) -> None:
    if family not in FAMILIES:
        raise EsdError(f"kohya's LoRA layout covers {', '.join(FAMILIES)}; this erase is of a {family} model — "
                       "share it in diffusers' LoRA layout (--to lora) instead")


def to_kohya(lora: Lora, family: str, v_prediction: bool = False,
             name: str = "esd") -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) in kohya's layout, with the header keys sd-scripts writes and clients read."""
    check_family(family)
    tensors: dict[str, Tensor] = {}
    ranks = set()
    for module, (down, up) in lora.items():
        key, rank = kohya_name(module, family), down.shape[0]
        ranks.add(rank)
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.lora_up.weight"] = up.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))  # (alpha / rank)·B·A = B·A
    rank = max(ranks)
    header = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(rank)),
        "ss_base_model_version": BASE_VERSION[family],
        "ss_v2": str(family == "sd2"),
        "ss_output_name": name,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ("stable-diffusion-v2-768-v" if family == "sd2" and v_prediction
                                   else ARCHITECTURE[family]) + "/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": name,
    }
    return tensors, header
