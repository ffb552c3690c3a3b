"""CompVis (LDM) single-file checkpoints in and out.

CompVis -> diffusers goes through diffusers' own single-file loaders, fed with the local configs in
`esd/configs/` so nothing is fetched from the hub. diffusers -> CompVis is ours: diffusers ships no
such converter, so `diffusers_to_compvis` maps every tensor by walking the model's blocks (any block
count, layers per block or transformer depth), for SD1.x, SD2.x and SDXL.

Layout of a CompVis Stable Diffusion file (keys are prefixes):
  model.diffusion_model.*                 UNet (openaimodel.UNetModel)
  model_ema.<name without dots>           optional EMA copy of the UNet (LitEma flattens names)
  first_stage_model.*                     VAE (encoder/decoder/quant_conv/post_quant_conv)
  cond_stage_model.transformer.*          SD1.x: OpenAI CLIP ViT-L/14 (a transformers CLIPTextModel)
  cond_stage_model.model.*                SD2.x: OpenCLIP ViT-H/14 text tower
  conditioner.embedders.0.transformer.*   SDXL: CLIP ViT-L/14
  conditioner.embedders.1.model.*         SDXL: OpenCLIP ViT-bigG/14 (with text_projection)
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor

from esd.errors import EsdError

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VAE_PREFIX = "first_stage_model."
CONFIGS = Path(__file__).parent / "configs"
FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")
YAML = {"sd1": "v1-inference.yaml", "sd2": "v2-inference.yaml", "sd2-v": "v2-inference-v.yaml", "sdxl": "sd_xl_base.yaml"}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
COMPVIS_SUFFIXES = PICKLE_SUFFIXES | {".safetensors"}
TO_CHOICES = ("compvis", "diffusers", "diffusers-unet")
# Where each text encoder lives in a CompVis file, per diffusers component name.
TEXT_PREFIXES = {
    "sd1": {"text_encoder": "cond_stage_model.transformer."},
    "sd2": {"text_encoder": "cond_stage_model.model."},
    "sdxl": {"text_encoder": "conditioner.embedders.0.transformer.", "text_encoder_2": "conditioner.embedders.1.model."},
}
N_SHOWN = 5  # how many offending keys an error message lists


def _first(keys, n: int = N_SHOWN) -> str:
    keys = list(keys)
    more = f" (and {len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# ------------------------------------------------------------------------------------- reading


def _sniff(path: Path) -> str:
    """'safetensors', 'pickle' or 'unknown', from the first bytes (suffixes lie, content does not)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0:
        return "safetensors"  # u64 header length, then the JSON header
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "pickle"  # torch's zip format, or the legacy format (a raw pickle stream)
    return "unknown"


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise EsdError(f"{path}: truncated or corrupt safetensors file ({err})") from err


def _read_pickle(path: Path) -> dict:
    # weights_only=True: the unpickler only builds tensors and plain containers and never runs code
    # a file names; anything else is refused, which is the point.
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = next((ln.strip() for ln in str(err).splitlines() if "Unsupported global" in ln), "")
        raise EsdError(
            f"{path}: the pickle holds Python objects other than tensors ({detail or 'refused by weights_only'}); "
            "it was not loaded, so none of its code ran. Re-save only its state_dict, or use a .safetensors file"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise EsdError(f"{path}: truncated or corrupt PyTorch checkpoint ({str(err).splitlines()[0]})") from err
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning checkpoints nest the weights, sometimes twice
    if not isinstance(obj, dict):
        raise EsdError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Read a CompVis checkpoint (`.ckpt`/`.pt` pickle or `.safetensors`) into a flat dict of tensors.

    Pickles are read with `weights_only=True`, so no code in the file ever runs. Raises `EsdError`
    naming the file for: a missing or unknown file, a truncated one, a pickle of other objects, and
    a file without Stable Diffusion UNet tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise EsdError(f"{path}: no such file")
    kind = _sniff(path)
    if kind == "unknown":
        raise EsdError(f"{path}: neither a PyTorch checkpoint (pickle/zip) nor a safetensors file")
    raw = _read_safetensors(path) if kind == "safetensors" else _read_pickle(path)
    tensors = {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if len(tensors) < len(raw):
        log.info("%s: ignoring %d non-tensor entries", path, len(raw) - len(tensors))
    if not any(k.startswith((UNET_PREFIX, EMA_PREFIX)) for k in tensors):
        hint = " (diffusers UNet names: pass the diffusers folder instead)" if "conv_in.weight" in tensors else ""
        raise EsdError(
            f"{path}: not a Stable Diffusion checkpoint, no '{UNET_PREFIX}*' tensors{hint}; "
            f"first keys: {_first(sorted(tensors)) or 'none'}"
        )
    return tensors


# ------------------------------------------------------------------------------ family and EMA


def _context_dim(state_dict: dict[str, Tensor]) -> int | None:
    """The UNet's cross-attention width: the text embedding size the model was trained with."""
    for key, value in state_dict.items():
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight"):
            return int(value.shape[1])
    return None


def _sd2_kind(name: str | None) -> str:
    # SD2 ships as 768-v (v-prediction, 768 px) and 512-base (ε, 512 px) with identical tensor
    # shapes, so only the file name can hint. 768-v is the flagship (2.0, 2.1): the default.
    lowered = (name or "").lower()
    family = "sd2" if ("512" in lowered or "base" in lowered) else "sd2-v"
    log.warning("%s: an SD2.x checkpoint; assuming %s (%s) from its name; pass --config to choose", name, family,
                "ε-prediction, 512 px" if family == "sd2" else "v-prediction, 768 px")
    return family


def detect_family(state_dict: dict[str, Tensor], name: str | None = None) -> str:
    """'sd1' | 'sd2' | 'sd2-v' | 'sdxl', from which text encoders the file holds (UNet width as fallback).

    ε vs v-prediction cannot be told from SD2 weights: a file name with '512' or 'base' gives 'sd2',
    anything else 'sd2-v' (SD 2.0/2.1 768-v, the common case). `--config` overrides the guess.
    """
    prefixes = {".".join(k.split(".")[:4]) + "." for k in state_dict}  # enough to tell every prefix below

    def has(prefix: str) -> bool:
        return any(p.startswith(prefix) for p in prefixes)

    if has("conditioner.embedders.1.model.") or has("conditioner.embedders.0.transformer."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        raise EsdError(f"{name}: an SDXL refiner checkpoint; only base models are supported")
    if has("cond_stage_model.model."):
        return _sd2_kind(name)
    if has("cond_stage_model.transformer."):
        return "sd1"
    by_width = {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(_context_dim(state_dict))
    if by_width is None:
        raise EsdError(f"{name}: cannot tell the model family (no known text encoder keys, cross-attention "
                       f"width {_context_dim(state_dict)}); pass --config DIR with a matching diffusers config")
    return _sd2_kind(name) if by_width == "sd2" else by_width


def ema_key(key: str) -> str:
    """The EMA twin of a UNet key: LitEma stores 'model.diffusion_model.a.b' as 'model_ema.diffusion_modelab'."""
    return EMA_PREFIX + key.removeprefix("model.").replace(".", "")


def has_ema(state_dict: dict[str, Tensor]) -> bool:
    """True when the file carries an EMA copy of the UNet (not just LitEma's decay/num_updates)."""
    return any(k.startswith(EMA_PREFIX + "diffusion_model") for k in state_dict)


def use_ema_weights(state_dict: dict[str, Tensor], name: str | Path | None = None) -> dict[str, Tensor]:
    """Return the state dict with the UNet tensors taken from `model_ema.*` when the file has them.

    The EMA weights are what people sample with (the 2023 ESD code fine-tuned the raw ones by
    accident, see DESIGN.md §1); a partial EMA copy is an error, not a silent mix.
    """
    if not has_ema(state_dict):
        return state_dict
    unet_keys = [k for k in state_dict if k.startswith(UNET_PREFIX)]
    missing = [k for k in unet_keys if ema_key(k) not in state_dict]
    if missing or not unet_keys:
        raise EsdError(f"{name}: has EMA weights (model_ema.*) but not for every UNet tensor: "
                       f"{_first(missing) or 'no model.diffusion_model.* keys to name them'}")
    out = dict(state_dict)
    out.update({k: state_dict[ema_key(k)] for k in unet_keys})
    log.info("%s: using the EMA weights (model_ema.*) for the UNet", name)
    return out


# ----------------------------------------------------------------- diffusers -> CompVis mapping

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


# ----------------------------------------------------------------------------------- loading


def _yaml_family(original_config: dict) -> str:
    """Family of an LDM yaml: SDXL has a conditioner; SD2 has 1024-wide context; 'v' parameterization."""
    params = original_config["model"]["params"]
    if "network_config" in params:
        return "sdxl"
    unet = params["unet_config"]["params"]
    if unet.get("context_dim") == 1024:
        return "sd2-v" if params.get("parameterization") == "v" else "sd2"
    return "sd1"


def resolve_config(family: str | None, config: str | Path | None, state_dict: dict, name) -> tuple[Path, dict | None]:
    """(diffusers config dir, LDM yaml dict or None) for a checkpoint, from `--config` or the family.

    A DIR is a diffusers model folder (or one of ours) that describes every component. A YAML only
    describes the UNet and VAE (and, through `parameterization`, the prediction type); text encoders,
    scheduler and tokenizers then come from the matching shipped folder.
    """
    if config is None:
        return CONFIGS / (family or detect_family(state_dict, str(name))), None
    config = Path(config)
    if config.is_dir():
        if not (config / "model_index.json").is_file():
            raise EsdError(f"--config {config}: not a diffusers pipeline folder (no model_index.json)")
        return config, None
    if config.suffix in (".yaml", ".yml") and config.is_file():
        import yaml

        original = yaml.safe_load(config.read_text())
        try:
            return CONFIGS / _yaml_family(original), original
        except (KeyError, TypeError) as err:
            raise EsdError(f"--config {config}: not an LDM model yaml (missing {err})") from err
    raise EsdError(f"--config {config}: expected a diffusers config folder or an LDM .yaml file")


def _component_class(library: str, name: str):
    return getattr(importlib.import_module(library), name)


def _unet_vae_configs(config_dir: Path, original_config: dict | None, state_dict: dict) -> dict[str, dict]:
    """UNet and VAE configs: from the yaml via diffusers' own translation, else from the folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if original_config is None:
        return {"unet": UNet2DConditionModel.load_config(config_dir / "unet"),
                "vae": AutoencoderKL.load_config(config_dir / "vae")}
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    return {"unet": create_unet_diffusers_config_from_ldm(original_config, state_dict),
            "vae": create_vae_diffusers_config_from_ldm(original_config, state_dict)}


def meta_pipeline(config_dir: Path, original_config: dict | None = None, state_dict: dict | None = None):
    """The pipeline's models built on the meta device (no memory, no weights): its expected layout."""
    index = json.loads((config_dir / "model_index.json").read_text())
    configs = _unet_vae_configs(config_dir, original_config, state_dict or {})
    parts = {}
    with torch.device("meta"):
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            library, cls_name = index.get(name, [None, None])
            if library is None:
                continue
            cls = _component_class(library, cls_name)
            if name in configs:
                parts[name] = cls.from_config(configs[name])
            else:
                parts[name] = cls(cls.config_class.from_pretrained(config_dir / name, local_files_only=True))
    return SimpleNamespace(**parts)


def check_layout(state_dict: dict[str, Tensor], expected: dict[str, Tensor], name, config) -> None:
    """Raise `EsdError` naming the first missing or mis-shaped keys when the file does not fit the config."""
    missing = [k for k in expected if k not in state_dict]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs config {tuple(v.shape)}"
             for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = [f"shapes differ: {_first(wrong)}"] * bool(wrong) + [f"{len(missing)} missing: {_first(missing)}"] * bool(missing)
    if problems:
        raise EsdError(f"{name}: does not match the config {config} ({'; '.join(problems)}); "
                       "pass --config with the model's own diffusers folder or LDM yaml")


def _tokenizer(folder: Path):
    """A tokenizer folder's CLIPTokenizer; ours hold only their config and borrow the shipped vocabulary."""
    from transformers import CLIPTokenizer

    from esd.tokenizer import clip_tokenizer

    if (folder / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    return clip_tokenizer(pad_token=settings.get("pad_token", "<|endoftext|>"))


def _latent_size(original_config: dict, config_dir: Path) -> int:
    """The latent side an LDM yaml states (`model.params.image_size`), else the family folder's."""
    size = original_config["model"]["params"].get("image_size")
    return int(size) if size else json.loads((config_dir / "unet" / "config.json").read_text())["sample_size"]


def _load_component(name: str, library: str, cls_name: str, state_dict: dict, config_dir: Path,
                    original_config: dict | None, dtype: torch.dtype):
    """One pipeline component, from the state dict (models) or the config folder (the rest)."""
    cls = _component_class(library, cls_name)
    dtype = None if dtype == torch.float32 else dtype  # float32 is the default; naming it makes diffusers warn
    common = dict(config=str(config_dir), subfolder=name, torch_dtype=dtype, local_files_only=True)
    if name in ("unet", "vae") and original_config is not None:
        model = cls.from_single_file(state_dict, original_config=original_config, torch_dtype=dtype)
        if name == "unet":  # diffusers guesses the size from the weights; the yaml or our folder knows it
            model.register_to_config(sample_size=_latent_size(original_config, config_dir))
        return model
    if name in ("unet", "vae"):
        return cls.from_single_file(state_dict, **common)
    if name.startswith("text_encoder"):
        from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

        return create_diffusers_clip_model_from_ldm(cls, state_dict, **common)
    if name.startswith("tokenizer"):
        return _tokenizer(config_dir / name)
    return cls.from_pretrained(str(config_dir), subfolder=name, local_files_only=True)  # the scheduler


def pipeline_from_state_dict(state_dict: dict[str, Tensor], config_dir: Path, original_config: dict | None = None,
                             torch_dtype: torch.dtype = torch.float32, name: str | Path = "checkpoint"):
    """Build the diffusers pipeline `config_dir` describes from a CompVis state dict, offline.

    Checks the tensors against the config first (diffusers would leave missing ones uninitialised
    on the meta device), then loads each model through diffusers' single-file converters.
    """
    expected = diffusers_to_compvis(meta_pipeline(config_dir, original_config, state_dict))
    check_layout(state_dict, expected, name, config_dir if original_config is None else "from the yaml")
    index = json.loads((config_dir / "model_index.json").read_text())
    pipe_cls = _component_class("diffusers", index["_class_name"])
    parts = {}
    for key, value in index.items():
        if key.startswith("_"):
            continue
        if isinstance(value, list):  # [library, class] or [null, null] for an absent component
            library, cls_name = value
            parts[key] = None if library is None else _load_component(
                key, library, cls_name, state_dict, config_dir, original_config, torch_dtype)
        else:
            parts[key] = value  # plain settings such as requires_safety_checker
    return pipe_cls(**parts)


def load_single_file(path: str | Path, family: str | None = None, config: str | Path | None = None,
                     torch_dtype: torch.dtype = torch.float32, sample_size: int | None = None):
    """Load a CompVis `.ckpt`/`.safetensors` file as a diffusers pipeline, offline.

    family: 'sd1' | 'sd2' | 'sd2-v' | 'sdxl' (default: detected, see `detect_family`).
    config: a diffusers config folder or an LDM yaml (overrides `family`; needed for non-standard sizes).
    sample_size: the UNet's default latent side, when neither config gives the right one.
    The UNet uses the file's EMA weights when it has them.
    """
    path = Path(path)
    if family is not None and family not in FAMILIES:
        raise EsdError(f"unknown model family {family!r}; choose from {', '.join(FAMILIES)}")
    state_dict = use_ema_weights(read_checkpoint(path), path)
    config_dir, original_config = resolve_config(family, config, state_dict, path)
    pipe = pipeline_from_state_dict(state_dict, config_dir, original_config, torch_dtype, name=path)
    if sample_size is not None:
        pipe.unet.register_to_config(sample_size=sample_size)
    return pipe


# ------------------------------------------------------------------------------------ saving


def _merge_into_base(state_dict: dict[str, Tensor], base: dict[str, Tensor]) -> dict[str, Tensor]:
    """The base file's tensors with its UNet (and EMA twin, if any) replaced by `state_dict`'s UNet."""
    unet = {k: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}
    base_unet = [k for k in base if k.startswith(UNET_PREFIX)]
    extra = [k for k in unet if k not in base]
    lacking = [k for k in base_unet if k not in unet]
    wrong = [k for k in unet if k in base and base[k].shape != unet[k].shape]
    if extra or lacking or wrong:
        raise EsdError(f"the UNet does not fit the base checkpoint: new {_first(extra)}; "
                       f"absent {_first(lacking)}; shapes differ {_first(wrong)}")
    out = dict(base)
    if has_ema(base):
        log.info("writing the new UNet into both model.diffusion_model.* and its EMA copy model_ema.*")
    for key, value in unet.items():
        value = value.to(base[key].dtype)  # keep the original's precision and file size
        out[key] = value
        if ema_key(key) in base:  # else tools reading the EMA copy would get the old, un-erased UNet
            out[ema_key(key)] = value
    return out


def save_compvis(state_dict: dict[str, Tensor], path: str | Path, base: dict[str, Tensor] | None = None,
                 metadata: dict[str, str] | None = None) -> Path:
    """Write a CompVis file atomically: `.ckpt`/`.pt` as a pickled {'state_dict': ...}, else safetensors.

    With `base` (the original checkpoint's tensors) the output holds every tensor of the original,
    its UNet replaced by the one in `state_dict`.
    """
    from safetensors.torch import save_file

    from esd.models import atomic_path

    path = Path(path)
    tensors = _merge_into_base(state_dict, base) if base is not None else state_dict
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        if path.suffix in PICKLE_SUFFIXES:
            torch.save({"state_dict": tensors}, tmp)
        else:
            save_file(_unshare(tensors), str(tmp), metadata={"format": "pt", **(metadata or {})})
    return path


def export_pipeline(pipe, dst: str | Path, base_file: str | Path | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write `pipe` as one CompVis file; a CompVis `base_file` contributes every tensor but the UNet.

    `dtype` casts every floating tensor (a model trained with half-precision frozen weights is written in
    one precision); with a base file, the base's own dtypes win.
    """
    base = None
    if base_file is not None and Path(base_file).is_file():
        base = read_checkpoint(base_file)
    state = diffusers_to_compvis(pipe)
    if dtype is not None:
        state = {k: v.to("cpu", dtype) if v.is_floating_point() else v for k, v in state.items()}
    return save_compvis(state, dst, base=base)


def _unshare(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses two names on one storage (the EMA twin written above); copy the repeats.
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen and value.numel() else value
        seen.add(ptr)
    return out


# ---------------------------------------------------------------------------------- convert


def _load_source(src: Path, config: str | Path | None, dtype: torch.dtype):
    """(pipeline, the original CompVis tensors or None) from a CompVis file or a diffusers folder."""
    if src.is_dir():
        from diffusers import DiffusionPipeline

        if not (src / "model_index.json").is_file():
            raise EsdError(f"{src}: not a diffusers pipeline folder (no model_index.json)")
        dtype_kwargs = {} if dtype == torch.float32 else {"dtype": dtype}
        return DiffusionPipeline.from_pretrained(str(src), local_files_only=True, **dtype_kwargs), None
    base = read_checkpoint(src)
    state_dict = use_ema_weights(base, src)
    config_dir, original_config = resolve_config(None, config, state_dict, src)
    return pipeline_from_state_dict(state_dict, config_dir, original_config, dtype, name=src), base


def _target(dst: Path, to: str | None) -> str:
    if to is None:
        to = "compvis" if dst.suffix in COMPVIS_SUFFIXES else "diffusers"
    if to not in TO_CHOICES:
        raise EsdError(f"--to {to}: choose from {', '.join(TO_CHOICES)}")
    if to == "compvis" and dst.suffix not in COMPVIS_SUFFIXES:
        raise EsdError(f"{dst}: a CompVis file must end in .safetensors or .ckpt")
    if to != "compvis" and dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise EsdError(f"{dst}: exists and is not an empty folder; choose a new output folder")
    return to


def _save_folder(model, dst: Path) -> None:
    """`save_pretrained` into a temporary sibling folder, then move it into place in one step."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        model.save_pretrained(str(tmp))
        if dst.is_dir():
            dst.rmdir()  # empty (checked before any work); os.replace cannot replace a folder
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert(src: str | Path, dst: str | Path, weights: str | Path | None = None, to: str | None = None,
            config: str | Path | None = None, torch_dtype: torch.dtype = torch.float32) -> Path:
    """Convert SRC (CompVis file or diffusers folder), optionally with ESD weights applied, to DST.

    to: 'compvis' (default when DST ends in .safetensors/.ckpt), 'diffusers' (a pipeline folder) or
    'diffusers-unet' (the UNet folder only). A CompVis -> CompVis conversion keeps every tensor of
    SRC and replaces only the UNet. Nothing is written unless everything succeeded.
    """
    src, dst = Path(src), Path(dst)
    target = _target(dst, to)
    if not src.exists():
        raise EsdError(f"{src}: no such file or folder")
    pipe, base = _load_source(src, config, torch_dtype)
    if weights is not None:
        from esd.models import apply_esd_weights

        apply_esd_weights(pipe.unet, weights)
    if target == "compvis":
        save_compvis(diffusers_to_compvis(pipe), dst, base=base)
    elif target == "diffusers":
        _save_folder(pipe, dst)
    else:
        _save_folder(pipe.unet, dst)
    return dst


def register(subparsers) -> argparse.ArgumentParser:
    """Add `convert SRC DST [--weights FILE] [--to ...] [--config DIR_OR_YAML]` to an argparse CLI."""
    parser = subparsers.add_parser(
        "convert",
        help="convert between CompVis single files and diffusers folders, optionally applying ESD weights",
        description="Convert SRC (a CompVis .ckpt/.safetensors or a diffusers folder) to DST. With --weights, "
        "the ESD-trained UNet parameters are applied first. CompVis -> CompVis keeps every other tensor of SRC.",
    )
    parser.add_argument("src", help="CompVis .ckpt/.safetensors file or diffusers pipeline folder")
    parser.add_argument("dst", help="output: a .safetensors/.ckpt file, or a new folder")
    parser.add_argument("--weights", default=None, help="ESD weights file (safetensors, diffusers UNet names)")
    parser.add_argument("--to", choices=TO_CHOICES, default=None,
                        help="output format (default: compvis when DST ends in .safetensors/.ckpt, else diffusers)")
    parser.add_argument("--config", default=None,
                        help="for a CompVis SRC: a diffusers config folder or LDM yaml (default: detected "
                        f"from the weights; shipped: {', '.join(FAMILIES)})")
    parser.set_defaults(run=run_convert)  # esd.cli dispatches on `run`
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """CLI entry: convert and say where the result is. `EsdError`s propagate to the CLI's handler."""
    dst = convert(args.src, args.dst, weights=args.weights, to=args.to, config=args.config)
    print(f"wrote {dst}")
    return 0
