"""diffusers -> CompVis files, and `convert` between CompVis files and diffusers folders.

Every write is atomic (nothing at DST unless everything succeeded). Given the original CompVis file, an
export keeps every tensor of it and replaces only the UNet (and its EMA copy), in the original's dtypes;
without one, the file holds what the diffusers pipeline holds, which for SD2.x is less than the original.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from esd.compvis.keys import TEXT_PREFIXES, diffusers_to_compvis
from esd.compvis.loading import pipeline_from_state_dict, resolve_config
from esd.compvis.reading import (
    COMPVIS_SUFFIXES,
    PICKLE_SUFFIXES,
    UNET_PREFIX,
    ema_key,
    first_keys,
    has_ema,
    read_checkpoint,
    transformer_family,
    use_ema_weights,
)
from esd.errors import EsdError
from esd.lowrank import HALF_KEPT_LOW
from esd.networks import is_transformer, network
from esd.weights import (
    apply_esd_weights,
    atomic_path,
    full_tensors,
    has_text_encoder_delta,
    load_esd_weights,
    split_text_encoder,
)

log = logging.getLogger(__name__)

TO_CHOICES = ("compvis", "comfyui", "diffusers", "diffusers-unet")
# Transformers whose diffusers names ComfyUI's "Load Diffusion Model" maps itself (comfy.model_detection).
COMFYUI_TRANSFORMERS = ("SD3Transformer2DModel", "FluxTransformer2DModel")


# ------------------------------------------------------------------------------------ saving


def _merge_into_base(state_dict: dict[str, Tensor], base: dict[str, Tensor],
                     text_encoder: bool = False) -> dict[str, Tensor]:
    """The base file's tensors with its UNet (and EMA twin, if any) replaced by `state_dict`'s UNet; with
    `text_encoder` (an erase that trained it) also every text-encoder tensor both files hold."""
    unet = {k: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}
    base_unet = [k for k in base if k.startswith(UNET_PREFIX)]
    extra = [k for k in unet if k not in base]
    lacking = [k for k in base_unet if k not in unet]
    wrong = [k for k in unet if k in base and base[k].shape != unet[k].shape]
    if extra or lacking or wrong:
        raise EsdError(f"the UNet does not fit the base checkpoint: new {first_keys(extra)}; "
                       f"absent {first_keys(lacking)}; shapes differ {first_keys(wrong)}")
    out = dict(base)
    if has_ema(base):
        log.info("writing the new UNet into both model.diffusion_model.* and its EMA copy model_ema.*")
    for key, value in unet.items():
        value = value.to(base[key].dtype)  # keep the original's precision and file size
        out[key] = value
        if ema_key(key) in base:  # else tools reading the EMA copy would get the old, un-erased UNet
            out[ema_key(key)] = value
    if text_encoder:  # both, not all: an SD2 base keeps the OpenCLIP layer diffusers drops (unused by SD)
        prefixes = tuple(p for parts in TEXT_PREFIXES.values() for p in parts.values())
        text = {k: v for k, v in state_dict.items() if k.startswith(prefixes) and k in base}
        if not text:
            raise EsdError("the text encoder does not fit the base checkpoint: no text-encoder tensor in common")
        out.update({k: v.to(base[k].dtype) for k, v in text.items()})
    return out


def save_compvis(state_dict: dict[str, Tensor], path: str | Path, base: dict[str, Tensor] | None = None,
                 metadata: dict[str, str] | None = None, text_encoder: bool = False) -> Path:
    """Write a CompVis file atomically: `.ckpt`/`.pt` as a pickled {'state_dict': ...}, else safetensors.

    With `base` (the original checkpoint's tensors) the output holds every tensor of the original,
    its UNet replaced by the one in `state_dict` (and its text encoder too with `text_encoder`).
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = _merge_into_base(state_dict, base, text_encoder) if base is not None else state_dict
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        if path.suffix in PICKLE_SUFFIXES:
            torch.save({"state_dict": tensors}, tmp)
        else:
            save_file(_unshare(tensors), str(tmp), metadata={"format": "pt", **(metadata or {})})
    return path


def _unshare(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses two names on one storage (the EMA twin written above); copy the repeats.
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen and value.numel() else value
        seen.add(ptr)
    return out


def warn_if_sd2_incomplete(state_dict: dict[str, Tensor], path: str | Path) -> bool:
    """Say so when an SD2.x file is written without the text encoder's last layer and projection.

    diffusers keeps only the OpenCLIP layers SD2 uses (it reads the penultimate layer's output), so an
    export from a diffusers pipeline lacks the last `resblocks` layer and `text_projection`. Stable Diffusion
    never reads them and the images are the same, but loaders notice (ComfyUI prints "clip missing: 18").
    Exporting with the original CompVis file as the base keeps them. Returns whether it warned.
    """
    prefix = TEXT_PREFIXES["sd2"]["text_encoder"]
    if not any(k.startswith(prefix) for k in state_dict) or f"{prefix}text_projection" in state_dict:
        return False
    blocks = f"{prefix}transformer.resblocks."
    n_layers = 1 + max((int(k[len(blocks):].split(".")[0]) for k in state_dict if k.startswith(blocks)), default=-1)
    log.warning("%s: an SD2.x file made from a diffusers pipeline lacks the text encoder's unused last layer "
                "(%s%d.*) and %stext_projection, which diffusers does not keep. Images are the same, but loaders "
                "may report missing CLIP tensors (ComfyUI: \"clip missing: 18\"); export from the original CompVis "
                "file (as the base model, or as convert's SRC) to keep them", path, blocks, n_layers, prefix)
    return True


def write_pipeline(pipe, dst: str | Path, base: dict[str, Tensor] | None = None,
                   dtype: torch.dtype | None = None, text_encoder: bool = False) -> Path:
    """Write `pipe` as one CompVis file; with `base` (the original's tensors) all but its UNet (and with
    `text_encoder`, its text encoder) come from it.

    `dtype` casts every floating tensor of the pipeline (the base's own dtypes win where it has them).
    """
    state = diffusers_to_compvis(pipe)
    if dtype is not None:
        state = {k: v.to("cpu", dtype) if v.is_floating_point() else v for k, v in state.items()}
    if base is None:
        warn_if_sd2_incomplete(state, dst)
    return save_compvis(state, dst, base=base, text_encoder=text_encoder)


def export_pipeline(pipe, dst: str | Path, base_file: str | Path | None = None,
                    dtype: torch.dtype | None = None, text_encoder: bool = False) -> Path:
    """Write `pipe` as one CompVis file; a CompVis `base_file` contributes every tensor but the UNet.

    `dtype` casts every floating tensor (a model trained with half-precision frozen weights is written in
    one precision); with a base file, the base's own dtypes win.
    """
    base = None
    if base_file is not None and Path(base_file).is_file():
        base = read_checkpoint(base_file)
    return write_pipeline(pipe, dst, base, dtype, text_encoder)


def write_transformer(net, dst: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write an SD3/FLUX transformer as one safetensors file, under its diffusers names, atomically.

    ComfyUI's "Load Diffusion Model" node (models/diffusion_models/) reads this layout: it recognises diffusers
    MMDiT names (SD3's `transformer_blocks.*.attn.add_q_proj`, FLUX's `x_embedder`) and maps them to its own,
    so no hand-written key map is needed here. The text encoders and VAE are not in it: ESD leaves them as they
    were, and ComfyUI loads them from their own files. `dtype` casts the floating tensors (the base's dtype).
    """
    from safetensors.torch import save_file

    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise EsdError(f"{dst}: an SD3/FLUX transformer is written as .safetensors (ComfyUI's diffusion-model "
                       "files); choose a name ending in .safetensors")
    state = {k: (v.to("cpu", dtype) if dtype is not None and v.is_floating_point() else v.to("cpu")).contiguous()
             for k, v in _unshare(net.state_dict()).items()}
    with atomic_path(dst) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "esd_layout": "diffusers-transformer"})
    return dst


def stored_dtype(where: Path) -> torch.dtype | None:
    """The floating dtype a diffusers model folder (or one safetensors file) stores its weights in (FLUX and SD3.5
    ship bf16), or None."""
    from safetensors import safe_open

    files = sorted(where.glob("*.safetensors")) if where.is_dir() else [where] if where.suffix == ".safetensors" else []
    for path in files:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                dtype = f.get_slice(key).get_dtype()
                if dtype in ("BF16", "F16", "F32"):
                    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dtype]
    return None


# ---------------------------------------------------------------------------------- convert


def _load_source(src: Path, config: str | Path | None, dtype: torch.dtype):
    """(pipeline, the original CompVis tensors or None) from a CompVis file or a diffusers folder."""
    if src.is_dir():
        from diffusers import DiffusionPipeline

        if not (src / "model_index.json").is_file():
            raise EsdError(f"{src}: not a diffusers pipeline folder (no model_index.json)")
        dtype_kwargs = {} if dtype == torch.float32 else {"dtype": dtype}
        return DiffusionPipeline.from_pretrained(str(src), local_files_only=True, **dtype_kwargs), None
    base = read_checkpoint(src, transformers=True)
    family = transformer_family(base)
    if family is not None:  # SD3/FLUX: the rest of the pipeline from --config
        from esd.compvis.transformer_files import load_transformer_file

        return load_transformer_file(src, base, family, config and str(config), dtype), None
    state_dict = use_ema_weights(base, src)
    config_dir, original_config = resolve_config(None, config, state_dict, src)
    return pipeline_from_state_dict(state_dict, config_dir, original_config, dtype, name=src), base


def _target(dst: Path, to: str | None) -> str:
    if to is None:  # a file: one file in the layout ComfyUI reads (CompVis for SD; see `convert`)
        to = "comfyui" if dst.suffix in COMPVIS_SUFFIXES else "diffusers"
    if to not in TO_CHOICES:
        raise EsdError(f"--to {to}: choose from {', '.join(TO_CHOICES)}")
    if to in ("compvis", "comfyui") and dst.suffix not in COMPVIS_SUFFIXES:
        raise EsdError(f"{dst}: a single file must end in .safetensors or .ckpt")
    if to not in ("compvis", "comfyui") and dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
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


def _trained_values(net, weights: str | Path) -> dict[str, Tensor]:
    """Copies of the network parameters a weights file sets (a LoRA file: the layers it adapts), before it is applied."""
    tensors, metadata = load_esd_weights(weights)
    names = full_tensors(net, split_text_encoder(tensors)[0], metadata, weights)
    return {name: net.get_parameter(name).detach().clone() for name in names}


def report_half_precision(before: dict[str, Tensor], net, dtype: torch.dtype, dst: Path) -> float:
    """Print the share of the erase's change a file in `dtype` keeps (`esd.lowrank.kept_in`); warn when it is low."""
    from esd.lowrank import kept_in

    after = {name: net.get_parameter(name).detach() for name in before}
    kept, ratio = kept_in(before, after, dtype)
    name = str(dtype).removeprefix("torch.")
    print(f"{dst.name}: written in the base's {name}, which keeps {kept:.1%} of the erase's change "
          f"(rounding error {ratio:.2f}x the change)")
    if kept < HALF_KEPT_LOW:
        print(f"warning: most of the erase is rounded away in {name}: share it as a LoRA instead (esd convert "
              "ESD.safetensors --to kohya DST --extract-lora R), write a diffusers folder (--to diffusers, fp32), "
              "or train longer", file=sys.stderr)
    return kept


def convert(src: str | Path, dst: str | Path, weights: str | Path | None = None, to: str | None = None,
            config: str | Path | None = None, torch_dtype: torch.dtype = torch.float32) -> Path:
    """Convert SRC (CompVis file or diffusers folder), optionally with ESD weights applied, to DST.

    to: 'comfyui' (default when DST ends in .safetensors/.ckpt: one file in the layout ComfyUI reads — for
    SD1.x/SD2.x/SDXL the CompVis checkpoint, for SD3/FLUX the transformer, see `write_transformer`), 'compvis'
    (SD only), 'diffusers' (a pipeline folder) or 'diffusers-unet' (the UNet folder only; an SD3/FLUX
    transformer's). A CompVis -> CompVis conversion keeps every tensor of SRC and replaces only the UNet.
    Nothing is written unless everything succeeded.
    """
    src, dst = Path(src), Path(dst)
    target = _target(dst, to)
    if not src.exists():
        raise EsdError(f"{src}: no such file or folder")
    pipe, base = _load_source(src, config, torch_dtype)
    net = network(pipe)
    if target == "compvis" and is_transformer(net):
        raise EsdError(f"--to compvis: {src} is a {type(pipe).__name__}, which has no CompVis (LDM) layout; "
                       "use --to comfyui (the transformer as ComfyUI reads it) or --to diffusers")
    text_encoder = weights is not None and has_text_encoder_delta(weights)
    if text_encoder and target == "diffusers-unet":
        raise EsdError(f"--weights {weights} also changes the text encoder, which a UNet folder cannot hold; "
                       "convert to a pipeline (--to diffusers) or a CompVis file instead")
    if target == "comfyui" and type(net).__name__ not in COMFYUI_TRANSFORMERS and is_transformer(net):
        raise EsdError(f"--to comfyui: {src} is a {type(pipe).__name__}; ComfyUI's mapping of diffusers "
                       "transformer names covers SD3 and FLUX.1, not this one, so no such file is written; "
                       "convert to a diffusers folder (--to diffusers) instead")
    out_dtype = None  # the dtype the erased layers are written in, where it is the base's rather than fp32
    if target == "comfyui" and is_transformer(net):
        out_dtype = stored_dtype(src / "transformer") if src.is_dir() else stored_dtype(src)
    elif target in ("compvis", "comfyui") and base is not None:
        out_dtype = next((v.dtype for k, v in base.items() if k.startswith(UNET_PREFIX)), None)
    if weights is not None:
        half = out_dtype in (torch.float16, torch.bfloat16)
        before = _trained_values(net, weights) if half else {}  # read the file again only to report the cast
        apply_esd_weights(pipe, weights)  # a LoRA file is merged into the weights
        if half:
            report_half_precision(before, net, out_dtype, dst)
    if target == "comfyui" and is_transformer(net):
        write_transformer(net, dst, out_dtype)
    elif target in ("compvis", "comfyui"):
        write_pipeline(pipe, dst, base, text_encoder=text_encoder)
    elif target == "diffusers":
        _save_folder(pipe, dst)
    else:
        _save_folder(net, dst)
    return dst
