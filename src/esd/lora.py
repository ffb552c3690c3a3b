"""LoRA erasing (`--lora-rank R`): θ is a rank-R update B·A of the layers a method selects, not their weights.

For the big families (SDXL, SD3.5, FLUX) a full ESD-u copy of θ and its Adam state do not fit beside the
frozen model; a rank-R update of the same layers does. The adapters are peft's, added with diffusers'
`add_adapter`; B starts at zero, so the model being trained starts as the original, and ε* (the network
with θ's original values swapped in, `esd.frozen`) is the original model exactly.

The output `esd.safetensors` is then a LoRA file in diffusers' own layout (`unet.<module>.lora_A.weight`,
`transformer.<module>.lora_B.weight`, ...), which `pipe.load_lora_weights(folder, weight_name=
"esd.safetensors")` loads; `esd generate / evaluate / convert` and the app merge it into the weights
(`merged_weights`). Only linear and convolution layers take a LoRA update: the norms some methods also
select (the q/k RMS norms of SD3.5 and FLUX) stay as they are.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from esd.errors import EsdError
from esd.lowrank import product
from esd.selection import trainable_names

ADAPTER = "esd"
_INTERNAL = re.compile(r"\.lora_([AB])\.[^.]+\.weight$")  # peft's names carry the adapter's: lora_A.esd.weight


def add_lora(net: nn.Module, method: str, rank: int) -> dict[str, nn.Parameter]:
    """Freeze `net`, add rank-`rank` LoRA adapters to the linear/conv layers `method` selects; return θ (A and B)."""
    from peft import LoraConfig

    names = trainable_names(net, method)
    modules = sorted({n.rsplit(".", 1)[0] for n in names
                      if isinstance(net.get_submodule(n.rsplit(".", 1)[0]), (nn.Linear, nn.Conv2d))})
    if not modules:
        raise EsdError(f"--lora-rank: method {method!r} selects no linear or convolution layer to adapt; "
                       "use another --method or leave --lora-rank out")
    net.requires_grad_(False)
    # lora_alpha = rank: the update is B·A itself (scale 1), whatever the rank.
    net.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=modules),
                    adapter_name=ADAPTER)
    params = {n: p for n, p in net.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    for p in params.values():
        p.requires_grad_(True)
    return params


def is_lora(names) -> bool:
    return any(".lora_A." in n or ".lora_B." in n for n in names)


def file_names(params: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """θ under diffusers' LoRA file names: `<prefix>.<module>.lora_A.weight` (prefix: unet or transformer)."""
    return {prefix + "." + _INTERNAL.sub(r".lora_\1.weight", name): t for name, t in params.items()}


def exported(params: dict[str, Tensor], metadata: dict[str, str]) -> dict[str, Tensor]:
    """What `esd.safetensors` holds: θ itself, or for a LoRA run θ under diffusers' LoRA file names."""
    return file_names(params, metadata["network"]) if is_lora(params) else params


@torch.no_grad()
def merged_weights(net: nn.Module, tensors: dict[str, Tensor], scale: float, path) -> dict[str, Tensor]:
    """The full weights W + scale·B·A of every layer a LoRA file adapts, as `<module>.weight` of `net`.

    B·A is taken over the flattened input dims, so one line covers linear (B: out×r, A: r×in) and convolution
    layers (B: out×r×1×1, A: r×in×k×k), as peft's own merge does.
    """
    own = dict(net.named_parameters())
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        match = re.fullmatch(r"(?:unet|transformer)\.(.+)\.lora_([AB])\.weight", key)
        if match is None:
            raise EsdError(f"--weights {path}: {key!r} is not a LoRA tensor name (<unet|transformer>.<module>."
                           "lora_A.weight); the file mixes LoRA and full tensors")
        modules.setdefault(match[1], {})[match[2]] = value
    merged = {}
    for module, ab in modules.items():
        weight = own.get(f"{module}.weight")
        if weight is None or set(ab) != {"A", "B"}:
            raise EsdError(f"--weights {path}: LoRA tensors for {module!r}, which this model "
                           f"{'lacks' if weight is None else 'has, but the file holds only lora_' + ''.join(ab)}; "
                           "was it made for another base model?")
        a, b = ab["A"].float(), ab["B"].float()
        if b.shape[0] != weight.shape[0] or a.shape[1:].numel() != weight.shape[1:].numel() or a.shape[0] != b.shape[1]:
            raise EsdError(f"--weights {path}: LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit "
                           f"{module} {tuple(weight.shape)}")
        merged[f"{module}.weight"] = weight.detach().float() + scale * product(a, b).to(weight.device)
    return merged
