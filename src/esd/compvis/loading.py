"""CompVis -> diffusers: build a pipeline from a single file, offline.

The conversion itself is diffusers' own single-file loaders; what this module adds is the configs they
need without the hub (the shipped folders in `esd/configs/`, or the user's `--config`), a check that the
file's tensors fit that config before anything is built, and our own text encoder configs and tokenizers.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor

from esd.compvis.keys import diffusers_to_compvis
from esd.compvis.reading import detect_family, first_keys, read_checkpoint, transformer_family, use_ema_weights
from esd.errors import EsdError

CONFIGS = Path(__file__).parent.parent / "configs"  # src/esd/configs
FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")
YAML = {"sd1": "v1-inference.yaml", "sd2": "v2-inference.yaml", "sd2-v": "v2-inference-v.yaml", "sdxl": "sd_xl_base.yaml"}


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


def _odd_tensor(value: Tensor, expected: Tensor) -> bool:
    """Not a plain (strided) floating-point tensor where the model has a weight: diffusers would silently cast
    an integer, bool or complex one to float. (Integer buffers such as position_ids may be float in merged files.)"""
    return value.layout != torch.strided or (expected.is_floating_point() and not value.is_floating_point())


def check_layout(state_dict: dict[str, Tensor], expected: dict[str, Tensor], name, config) -> None:
    """Raise `EsdError` naming the first missing, mis-shaped or non-float keys when the file does not fit the config."""
    missing = [k for k in expected if k not in state_dict]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs config {tuple(v.shape)}"
             for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    odd = [f"{k} ({state_dict[k].dtype}, {state_dict[k].layout})"
           for k, v in expected.items() if k in state_dict and _odd_tensor(state_dict[k], v)]
    problems = ([f"shapes differ: {first_keys(wrong)}"] * bool(wrong) + [f"wrong kind of tensor: {first_keys(odd)}"] * bool(odd)
                + [f"{len(missing)} missing: {first_keys(missing)}"] * bool(missing))
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

    An SD3/FLUX transformer file takes the rest of its pipeline from `config` (a diffusers pipeline folder or
    Hugging Face id; see `esd.compvis.transformer_files`).
    family: 'sd1' | 'sd2' | 'sd2-v' | 'sdxl' (default: detected, see `detect_family`).
    config: a diffusers config folder or an LDM yaml (overrides `family`; needed for non-standard sizes).
    sample_size: the UNet's default latent side, when neither config gives the right one.
    The UNet uses the file's EMA weights when it has them.
    """
    path = Path(path)
    if family is not None and family not in FAMILIES:
        raise EsdError(f"unknown model family {family!r}; choose from {', '.join(FAMILIES)}")
    tensors = read_checkpoint(path, transformers=True)
    transformer = transformer_family(tensors)
    if transformer is not None:  # SD3/FLUX: the transformer from the file, the rest from the --config pipeline
        from esd.compvis.transformer_files import load_transformer_file

        return load_transformer_file(path, tensors, transformer, None if config is None else str(config), torch_dtype)
    state_dict = use_ema_weights(tensors, path)
    config_dir, original_config = resolve_config(family, config, state_dict, path)
    pipe = pipeline_from_state_dict(state_dict, config_dir, original_config, torch_dtype, name=path)
    if sample_size is not None:
        pipe.unet.register_to_config(sample_size=sample_size)
    return pipe
