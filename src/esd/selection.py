"""Which UNet parameters each ESD method trains (docs/design.md, "Parameter sets").

Rules are written on diffusers UNet parameter names, by module role: `attn2` is cross-attention
(text -> image), `attn1` self-attention; the top-level `time_embedding`/`time_proj`/`add_embedding`
modules embed the timestep (and SDXL's pooled text + size ids); `conv_norm_out`/`conv_out` are the
output head. The same rules therefore hold for SD1.x, SD2.x and SDXL UNets.

SD3/SD3.5 (MMDiT), FLUX.1 and FLUX.2 transformers have no cross-attention: text and image are two token streams
that meet in one *joint* attention per block, each stream with its own projections. Text enters the
image stream only as the keys and values the image queries attend to, made by the text-side projections
(`add_k_proj`, `add_v_proj`; `add_q_proj` and `to_add_out` carry the text stream on to the next block).
So on transformers (`TRANSFORMER_RULES`): xattn = the text-side projections of the joint attention
(`add_{q,k,v}_proj`, `to_add_out`, their q/k norms); x-strict = `add_k_proj` and `add_v_proj` only, the
exact counterpart of ESD-x-strict's `to_k`/`to_v` of attn2; selfattn = the image-side projections of the
joint attention (`to_q/k/v`, `to_out`) and SD3.5's image-only `attn2`. FLUX's single-stream blocks run one
attention over the concatenated text and image tokens with shared projections: no part of them is
text-only or image-only, so xattn, x-strict and selfattn leave them out; noxattn and full train them.
FLUX.2 names its dual-stream attention as FLUX.1 does (the same rules select the same roles); its single-stream
blocks fuse q, k, v and the MLP into one projection (`to_qkv_mlp_proj`), shared by both streams as in FLUX.1,
and its adaLN modulations are shared by all blocks (`double_stream_modulation_*`, `single_stream_modulation`,
trained by noxattn as FLUX.1's per-block `norm1.linear` are).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from esd.config import METHOD_ALIASES
from esd.errors import EsdError
from esd.networks import is_transformer

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


# Transformers (SD3, FLUX): top-level embedders of time/guidance/pooled text and of the text sequence, and the head.
T_TIME = {"time_text_embed", "time_guidance_embed"}  # FLUX.2's embeds time (and guidance) without pooled text
T_TEXT_IN = {"context_embedder"}
T_HEAD = {"norm_out", "proj_out"}
_TEXT_SIDE = (".attn.add_q_proj.", ".attn.add_k_proj.", ".attn.add_v_proj.", ".attn.to_add_out.",
              ".attn.norm_added_q.", ".attn.norm_added_k.")
_IMAGE_SIDE = (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".attn.to_out.", ".attn.norm_q.", ".attn.norm_k.", ".attn2.")


def _joint(name: str, parts: tuple[str, ...]) -> bool:
    """A parameter of a dual-stream block's attention (`transformer_blocks.N.attn...`) matching one of `parts`."""
    return name.startswith("transformer_blocks.") and any(part in name for part in parts)


TRANSFORMER_RULES: dict[str, Callable[[str], bool]] = {
    "xattn": lambda n: _joint(n, _TEXT_SIDE),
    "noxattn": lambda n: not _joint(n, _TEXT_SIDE) and _top(n) not in T_TIME | T_TEXT_IN | T_HEAD,
    "selfattn": lambda n: _joint(n, _IMAGE_SIDE),
    "full": lambda n: True,
    "notime": lambda n: _top(n) not in T_TIME | T_HEAD,
    "x-strict": lambda n: _joint(n, (".attn.add_k_proj.", ".attn.add_v_proj.")),
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
    if is_transformer(unet):
        if method not in TRANSFORMER_RULES:
            raise EsdError(f"method {method!r} names SD1.x/SD2.x UNet blocks and has no counterpart in a "
                           f"{type(unet).__name__}; use one of {', '.join(TRANSFORMER_RULES)}")
        names = [name for name, _ in unet.named_parameters() if TRANSFORMER_RULES[method](name)]
        if not names:
            raise EsdError(f"method {method!r} selects no parameter of this {type(unet).__name__}; "
                           "choose another --method, e.g. xattn")
        return names
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


TRANSFORMER_GROUPS: list[tuple[str, Callable[[str], bool]]] = [
    ("joint attention, text side (add_q/k/v_proj, to_add_out)", lambda n: _joint(n, _TEXT_SIDE)),
    ("joint attention, image side (to_q/k/v, to_out, attn2)", lambda n: _joint(n, _IMAGE_SIDE)),
    ("dual-stream feed-forward and modulation", lambda n: n.startswith("transformer_blocks.")),
    ("single-stream blocks (FLUX)", lambda n: n.startswith("single_transformer_blocks.")),
    ("time/guidance/pooled-text embedding (time_text_embed)", lambda n: _top(n) in T_TIME),
    ("text input (context_embedder)", lambda n: _top(n) in T_TEXT_IN),
    ("patch embedding (pos_embed, x_embedder)", lambda n: _top(n) in {"pos_embed", "x_embedder"}),
    ("output head (norm_out, proj_out)", lambda n: _top(n) in T_HEAD),
]


def module_group(name: str, transformer: bool = False) -> str:
    """The role of a network parameter, for humans: which module group of the table it belongs to."""
    return next((group for group, match in (TRANSFORMER_GROUPS if transformer else GROUPS) if match(name)), "other")


def group_table(unet: nn.Module, trained: list[str]) -> list[tuple[str, int, int, int, int]]:
    """Per module group: (group, trained tensors, tensors, trained parameters, parameters); empty groups left out."""
    chosen = set(trained)
    rows: dict[str, list[int]] = {}
    transformer = is_transformer(unet)
    for name, param in unet.named_parameters():
        row = rows.setdefault(module_group(name, transformer), [0, 0, 0, 0])
        row[1] += 1
        row[3] += param.numel()
        if name in chosen:
            row[0] += 1
            row[2] += param.numel()
    order = [group for group, _ in (TRANSFORMER_GROUPS if transformer else GROUPS)] + ["other"]
    return [(group, *rows[group]) for group in order if group in rows]
