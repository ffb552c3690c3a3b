"""Which UNet parameters each ESD method trains (DESIGN.md §1, parameter-set table).

Rules are written on diffusers UNet parameter names, by module role: `attn2` is cross-attention
(text -> image), `attn1` self-attention; the top-level `time_embedding`/`time_proj`/`add_embedding`
modules embed the timestep (and SDXL's pooled text + size ids); `conv_norm_out`/`conv_out` are the
output head. The same rules therefore hold for SD1.x, SD2.x and SDXL UNets.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from esd.config import METHOD_ALIASES
from esd.errors import EsdError

TIME_EMBEDDING = {"time_embedding", "time_proj", "add_embedding", "add_time_proj"}
OUTPUT_HEAD = {"conv_norm_out", "conv_out"}
# LDM output_blocks.6/.8 and input_blocks.4/.7 of SD1.x, in diffusers naming.
XLAYER_BLOCKS = ("up_blocks.2.attentions.0.", "up_blocks.2.attentions.2.")
SELFLAYER_BLOCKS = ("down_blocks.1.attentions.0.", "down_blocks.2.attentions.0.")


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def _is_time_or_head(name: str) -> bool:
    return _top(name) in TIME_EMBEDDING | OUTPUT_HEAD


RULES: dict[str, Callable[[str], bool]] = {
    "xattn": lambda n: "attn2" in n,
    "noxattn": lambda n: "attn2" not in n and not _is_time_or_head(n),
    "selfattn": lambda n: "attn1" in n,
    "full": lambda n: True,
    "notime": lambda n: not _is_time_or_head(n),
    "xlayer": lambda n: "attn2" in n and n.startswith(XLAYER_BLOCKS),
    "selflayer": lambda n: "attn1" in n and n.startswith(SELFLAYER_BLOCKS),
    "x-strict": lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n,
}


def trainable_names(unet: nn.Module, method: str) -> list[str]:
    """Names of the parameters `method` trains, in `named_parameters()` order; error if none."""
    method = METHOD_ALIASES.get(method, method)
    if method not in RULES:
        raise EsdError(f"unknown method {method!r}; choose one of {', '.join([*RULES, *METHOD_ALIASES])}")
    names = [name for name, _ in unet.named_parameters() if RULES[method](name)]
    if not names:
        raise EsdError(f"method {method!r} selects no parameter of this UNet "
                       f"({type(unet).__name__}); choose another --method, e.g. xattn")
    return names


def select_parameters(unet: nn.Module, method: str) -> dict[str, nn.Parameter]:
    """Freeze the whole UNet, then unfreeze and return the parameters `method` trains."""
    names = set(trainable_names(unet, method))
    selected = {}
    for name, param in unet.named_parameters():
        param.requires_grad_(name in names)
        if name in names:
            selected[name] = param
    return selected
