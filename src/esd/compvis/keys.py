"""diffusers -> CompVis tensor names, for SD1.x, SD2.x and SDXL.

diffusers ships no such converter, so every name is mapped by walking the model's own blocks: any block
count, layers per block or transformer depth works, not only the published layouts. The reverse direction
(CompVis -> diffusers) is diffusers' single-file loader, see `esd.compvis.loading`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from esd.compvis.reading import UNET_PREFIX, VAE_PREFIX

# Where each text encoder lives in a CompVis file, per diffusers component name.
TEXT_PREFIXES = {
    "sd1": {"text_encoder": "cond_stage_model.transformer."},
    "sd2": {"text_encoder": "cond_stage_model.model."},
    "sdxl": {"text_encoder": "conditioner.embedders.0.transformer.", "text_encoder_2": "conditioner.embedders.1.model."},
}

_RESNET_UNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_RESNET_VAE = {"conv_shortcut": "nin_shortcut"}  # the VAE's other resnet names agree
_ATTN_VAE = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_prefixes(unet) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers module prefix -> (CompVis prefix, renames inside it), by walking the UNet's blocks.

    LDM numbers the UNet as flat lists: input_blocks (conv_in, then per level its resnet[+attention]
    layers and a downsampler), middle_block (resnet, attention, resnet), output_blocks (per level its
    resnet[+attention] layers, the last also holding the upsampler).
    """
    top = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2", "class_embedding.linear_1": "label_emb.0.0",
           "class_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    pre = {k: (v, {}) for k, v in top.items()}
    index = 1
    for i, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            pre[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{index}.0", _RESNET_UNET)
            pre[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{index}.1", {})
            index += 1
        if getattr(block, "downsamplers", None):
            pre[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", {})
            index += 1
    pre["mid_block.resnets.0"] = ("middle_block.0", _RESNET_UNET)
    pre["mid_block.attentions.0"] = ("middle_block.1", {})
    pre["mid_block.resnets.1"] = ("middle_block.2", _RESNET_UNET)
    index = 0
    for i, block in enumerate(unet.up_blocks):
        has_attn = bool(getattr(block, "attentions", None))
        for j in range(len(block.resnets)):
            pre[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{index}.0", _RESNET_UNET)
            pre[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{index}.1", {})
            index += 1
        if getattr(block, "upsamplers", None):  # sits after the level's last layer
            pre[f"up_blocks.{i}.upsamplers.0.conv"] = (f"output_blocks.{index - 1}.{2 if has_attn else 1}.conv", {})
    return pre


def _vae_prefixes(vae) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers VAE module prefix -> (CompVis prefix, renames); LDM numbers decoder levels bottom-up."""
    pre = {"encoder.conv_norm_out": ("encoder.norm_out", {}), "decoder.conv_norm_out": ("decoder.norm_out", {})}
    for part in ("encoder", "decoder"):
        pre[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", _RESNET_VAE)
        pre[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", _RESNET_VAE)
        pre[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _ATTN_VAE)
    for i, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            pre[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", _RESNET_VAE)
        pre[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", {})
    n_up = len(vae.decoder.up_blocks)
    for i, block in enumerate(vae.decoder.up_blocks):
        level = n_up - 1 - i
        for j in range(len(block.resnets)):
            pre[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{level}.block.{j}", _RESNET_VAE)
        pre[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", {})
    return pre


def _rename(key: str, prefixes: dict[str, tuple[str, dict[str, str]]]) -> str:
    """Map one diffusers key through the longest matching module prefix; unmatched keys keep their name."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:n])
        if head in prefixes:
            new_head, renames = prefixes[head]
            rest = ".".join(parts[n:])
            for old, new in renames.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            return f"{new_head}.{rest}"
    return key


def unet_key_map(unet) -> dict[str, str]:
    """diffusers UNet state-dict name -> CompVis name (with the `model.diffusion_model.` prefix)."""
    prefixes = _unet_prefixes(unet)
    return {k: UNET_PREFIX + _rename(k, prefixes) for k in unet.state_dict()}


def unet_to_compvis(unet, state_dict: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The UNet's tensors (or those of `state_dict`, diffusers names) under their CompVis names."""
    names = unet_key_map(unet)
    tensors = unet.state_dict() if state_dict is None else state_dict
    return {names[k]: v for k, v in tensors.items()}


def vae_to_compvis(vae) -> dict[str, Tensor]:
    """VAE tensors under `first_stage_model.*`; mid-block attention q/k/v/proj_out as 1x1 convs."""
    prefixes = _vae_prefixes(vae)
    out = {}
    for key, value in vae.state_dict().items():
        name = _rename(key, prefixes)
        if ".mid.attn_1." in name and name.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's AttnBlock uses Conv2d(C, C, 1), diffusers Linear
        out[VAE_PREFIX + name] = value
    return out


def _text_state(text_encoder) -> dict[str, Tensor]:
    """Text-model tensors without the `text_model.` prefix (transformers >= 5.6 drops it for CLIPTextModel)."""
    return {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}


def clip_to_compvis(text_encoder, prefix: str) -> dict[str, Tensor]:
    """OpenAI CLIP (SD1.x, SDXL's first encoder): the transformers layout under `<prefix>text_model.`."""
    tensors = _text_state(text_encoder)
    tensors.pop("text_projection.weight", None)  # SD1.x/SDXL use hidden states, LDM files hold no projection
    out = {f"{prefix}text_model.{k}": v for k, v in tensors.items()}
    n_pos = text_encoder.config.max_position_embeddings
    # Older transformers saved position_ids; published files have them, LDM code may expect them.
    out[f"{prefix}text_model.embeddings.position_ids"] = torch.arange(n_pos, device=_device(tensors))[None]
    return out


def _device(tensors: dict[str, Tensor]) -> torch.device:
    return next(iter(tensors.values())).device


_OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def openclip_to_compvis(text_encoder, prefix: str) -> dict[str, Tensor]:
    """OpenCLIP text tower (SD2.x, SDXL's second encoder): fused q/k/v `in_proj`, `resblocks`, `ln_final`.

    diffusers drops SD2's unused last layer and projection, so an SD2 export lacks
    `transformer.resblocks.23` and `text_projection` (`save_compvis(base=...)` keeps the original's).
    """
    tensors = _text_state(text_encoder)
    out = {
        f"{prefix}token_embedding.weight": tensors["embeddings.token_embedding.weight"],
        f"{prefix}positional_embedding": tensors["embeddings.position_embedding.weight"],
        f"{prefix}ln_final.weight": tensors["final_layer_norm.weight"],
        f"{prefix}ln_final.bias": tensors["final_layer_norm.bias"],
    }
    if "text_projection.weight" in tensors:  # Linear weight (out, in); OpenCLIP multiplies x @ P (in, out)
        out[f"{prefix}text_projection"] = tensors["text_projection.weight"].T.contiguous()
    for i in range(text_encoder.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            qkv = [tensors[f"{src}self_attn.{p}_proj.{part}"] for p in "qkv"]
            out[f"{dst}attn.in_proj_{part}"] = torch.cat(qkv, dim=0)
            for old, new in _OPENCLIP_LAYER.items():
                out[f"{dst}{new}.{part}"] = tensors[f"{src}{old}.{part}"]
    return out


def _is_openclip(text_encoder) -> bool:
    # OpenCLIP towers use plain GELU; OpenAI's CLIP uses quick-GELU. diffusers keeps that distinction.
    return text_encoder.config.hidden_act == "gelu"


def text_encoders_to_compvis(pipe) -> dict[str, Tensor]:
    """Every text encoder of `pipe` under its CompVis prefix (SD1.x, SD2.x or SDXL layout)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        prefixes = TEXT_PREFIXES["sdxl"]
        return {**clip_to_compvis(pipe.text_encoder, prefixes["text_encoder"]),
                **openclip_to_compvis(pipe.text_encoder_2, prefixes["text_encoder_2"])}
    if _is_openclip(pipe.text_encoder):
        return openclip_to_compvis(pipe.text_encoder, TEXT_PREFIXES["sd2"]["text_encoder"])
    return clip_to_compvis(pipe.text_encoder, TEXT_PREFIXES["sd1"]["text_encoder"])


def diffusers_to_compvis(pipe) -> dict[str, Tensor]:
    """A diffusers SD1.x/SD2.x/SDXL pipeline as one CompVis state dict (UNet, VAE, text encoders)."""
    out = {**unet_to_compvis(pipe.unet), **vae_to_compvis(pipe.vae), **text_encoders_to_compvis(pipe)}
    return {k: v.detach() for k, v in out.items()}
