"""Which UNet parameters each ESD method trains (docs/design.md, "Parameter sets").

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
LAYER_METHODS = ("xlayer", "selflayer")


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


def _is_sdxl_unet(unet: nn.Module) -> bool:
    """SDXL's UNet: pooled text + size ids enter through a "text_time" added embedding."""
    config = getattr(unet, "config", None)
    return getattr(config, "addition_embed_type", None) == "text_time"


def trainable_names(unet: nn.Module, method: str) -> list[str]:
    """Names of the parameters `method` trains, in `named_parameters()` order; error if none."""
    method = METHOD_ALIASES.get(method, method)
    if method not in RULES:
        raise EsdError(f"unknown method {method!r}; choose one of {', '.join([*RULES, *METHOD_ALIASES])}")
    if method in LAYER_METHODS and _is_sdxl_unet(unet):
        # These name blocks of SD1.x's 4-level layout (SD2.x shares it). SDXL has 3 levels and puts no
        # attention where xlayer points, so any SDXL meaning would be our invention, not the 2023 method.
        raise EsdError(f"method {method!r} names SD1.x/SD2.x UNet blocks (LDM output_blocks.6/.8, "
                       "input_blocks.4/.7) and has no counterpart in SDXL's layout; use xattn, x-strict or selfattn")
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


# ------------------------------------------------------------------ module groups (model card)

# (group, predicate) in order; the first match names a parameter's group.
GROUPS: list[tuple[str, Callable[[str], bool]]] = [
    ("cross-attention (attn2)", lambda n: ".attn2." in n),
    ("self-attention (attn1)", lambda n: ".attn1." in n),
    ("transformer feed-forward, norms, proj_in/out", lambda n: ".attentions." in n),
    ("resnets (incl. their time projections)", lambda n: ".resnets." in n),
    ("down/up-samplers", lambda n: "samplers." in n),
    ("time embedding (time_embedding)", lambda n: _top(n) in {"time_embedding", "time_proj"}),
    ("SDXL text/size embedding (add_embedding)", lambda n: _top(n) in {"add_embedding", "add_time_proj"}),
    ("input conv (conv_in)", lambda n: _top(n) == "conv_in"),
    ("output head (conv_norm_out, conv_out)", lambda n: _top(n) in OUTPUT_HEAD),
]


def module_group(name: str) -> str:
    """The role of a UNet parameter, for humans: which module group of the table it belongs to."""
    return next((group for group, match in GROUPS if match(name)), "other")


def group_table(unet: nn.Module, trained: list[str]) -> list[tuple[str, int, int, int, int]]:
    """Per module group: (group, trained tensors, tensors, trained parameters, parameters); empty groups left out."""
    chosen = set(trained)
    rows: dict[str, list[int]] = {}
    for name, param in unet.named_parameters():
        row = rows.setdefault(module_group(name), [0, 0, 0, 0])
        row[1] += 1
        row[3] += param.numel()
        if name in chosen:
            row[0] += 1
            row[2] += param.numel()
    order = [group for group, _ in GROUPS] + ["other"]
    return [(group, *rows[group]) for group in order if group in rows]
