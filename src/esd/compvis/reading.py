"""Reading CompVis files: sniff the format, unpickle safely, tell the model family, pick the EMA weights.

Nothing here needs diffusers: a file is read into a flat dict of tensors and inspected by key names
and shapes only.
"""

from __future__ import annotations

import logging
import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from esd.errors import EsdError

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VAE_PREFIX = "first_stage_model."
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
COMPVIS_SUFFIXES = PICKLE_SUFFIXES | {".safetensors"}
N_SHOWN = 5  # how many offending keys an error message lists


def first_keys(keys, n: int = N_SHOWN) -> str:
    """The first `n` keys for an error message, and how many more there are."""
    keys = list(keys)
    more = f" (and {len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# ------------------------------------------------------------------------------------- reading


def _sniff(path: Path) -> str:
    """'safetensors', 'pickle' or 'unknown', from the first bytes (suffixes lie, content does not)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as err:
        raise EsdError(f"{path}: cannot be read ({err.strerror or err})") from err
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


# What torch.load(weights_only=True) raises on a damaged file: its unpickler is plain Python, so a corrupt
# stream fails wherever it happens to break (a missing memo entry, a call with the wrong arguments, a short
# read). Found by tests/test_hostile_files.py; each of these is "truncated or corrupt" to the user.
CORRUPT_PICKLE_ERRORS = (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, LookupError,
                         AssertionError, AttributeError, TypeError, ArithmeticError, struct.error, MemoryError)


def _read_pickle(path: Path) -> dict:
    # weights_only=True: the unpickler only builds tensors and plain containers and never runs code
    # a file names; anything else is refused, which is the point. An open file rather than the path:
    # torch.load hands a path ending in .safetensors to safetensors, and here the content decides.
    try:
        with open(path, "rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"GLOBAL (\S+)", str(err))  # the unpickler names the function or class it refused
        if refused is None:  # a damaged stream (an unknown opcode, a bad string), not a refused object
            raise EsdError(f"{path}: truncated or corrupt PyTorch checkpoint ({_line(err, -1)})") from err
        raise EsdError(
            f"{path}: the pickle holds Python objects other than tensors (refused {refused.group(1)}); "
            "it was not loaded, so none of its code ran. Re-save only its state_dict, or use a .safetensors file"
        ) from err
    except CORRUPT_PICKLE_ERRORS as err:
        raise EsdError(f"{path}: truncated or corrupt PyTorch checkpoint ({_line(err, 0)})") from err
    seen = set()  # a pickle can make a dict its own "state_dict": unwrap each dict once, never forever
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) and id(obj) not in seen:
        seen.add(id(obj))
        obj = obj["state_dict"]  # Lightning checkpoints nest the weights, sometimes twice
    if not isinstance(obj, dict):
        raise EsdError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def _line(err: BaseException, index: int) -> str:
    """One line of an error's message (torch's run to pages), or its type when it has none."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
    return lines[index][:300]


def read_checkpoint(path: str | Path, transformers: bool = False) -> dict[str, Tensor]:
    """Read a CompVis checkpoint (`.ckpt`/`.pt` pickle or `.safetensors`) into a flat dict of tensors.

    Pickles are read with `weights_only=True`, so no code in the file ever runs. Raises `EsdError`
    naming the file for: a missing or unknown file, a truncated one, a pickle of other objects, and
    a file without Stable Diffusion UNet tensors. With `transformers`, an SD3/FLUX transformer file is
    returned as it is (`transformer_family` tells it; `esd.compvis.transformer_files` loads it).
    """
    path = Path(path)
    if path.is_dir():
        raise EsdError(f"{path}: a folder, not a checkpoint file")
    if not path.is_file():
        raise EsdError(f"{path}: {'not a regular file' if path.exists() else 'no such file'}")
    if path.stat().st_size == 0:
        raise EsdError(f"{path}: an empty file (an interrupted download or copy?)")
    kind = _sniff(path)
    if kind == "unknown":
        raise EsdError(f"{path}: neither a PyTorch checkpoint (pickle/zip) nor a safetensors file")
    raw = _read_safetensors(path) if kind == "safetensors" else _read_pickle(path)
    tensors = {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if len(tensors) < len(raw):
        log.info("%s: ignoring %d non-tensor entries", path, len(raw) - len(tensors))
    transformer = transformer_family(tensors)
    if transformer is not None and transformers:
        return tensors
    if transformer is not None:
        example = {"FLUX.1": "black-forest-labs/FLUX.1-dev", "FLUX.2": "black-forest-labs/FLUX.2-dev"}.get(
            transformer, "stabilityai/stable-diffusion-3.5-medium")
        raise EsdError(f"{path}: a {transformer} transformer file, not a CompVis checkpoint; load it as --model "
                       f"with --config naming its pipeline (e.g. {example}), or pass the pipeline itself")
    if not any(k.startswith((UNET_PREFIX, EMA_PREFIX)) for k in tensors):
        hint = " (diffusers UNet names: pass the diffusers folder instead)" if "conv_in.weight" in tensors else ""
        raise EsdError(
            f"{path}: not a Stable Diffusion checkpoint, no '{UNET_PREFIX}*' tensors{hint}; "
            f"first keys: {first_keys(sorted(tensors)) or 'none'}"
        )
    return tensors


# ------------------------------------------------------------------------------ family and EMA


def transformer_family(tensors: dict) -> str | None:
    """'SD3/SD3.5', 'FLUX.1' or 'FLUX.2' when the tensors are such a transformer, in the original (Stability's
    `joint_blocks`, Black Forest Labs' `double_blocks`, with or without ComfyUI's `model.diffusion_model.`
    prefix) or diffusers' naming; None otherwise."""
    names = {k.removeprefix("model.diffusion_model.") for k in tensors}
    if any(n.startswith(("single_stream_modulation.", "double_stream_modulation_")) for n in names):
        return "FLUX.2"  # its modulations are shared by all blocks (both namings)
    if any(n.startswith(("double_blocks.", "single_blocks.", "single_transformer_blocks.")) for n in names):
        return "FLUX.1"
    if any(n.startswith("joint_blocks.") for n in names) or any(".attn.add_k_proj." in n for n in names):
        return "SD3/SD3.5"
    return None


def _context_dim(state_dict: dict[str, Tensor]) -> int | None:
    """The UNet's cross-attention width: the text embedding size the model was trained with."""
    for key, value in state_dict.items():
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight") and value.ndim == 2:
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
    accident, see docs/design.md, "Traps in the original code"); a partial EMA copy is an error, not a
    silent mix.
    """
    if not has_ema(state_dict):
        return state_dict
    unet_keys = [k for k in state_dict if k.startswith(UNET_PREFIX)]
    missing = [k for k in unet_keys if ema_key(k) not in state_dict]
    if missing or not unet_keys:
        raise EsdError(f"{name}: has EMA weights (model_ema.*) but not for every UNet tensor: "
                       f"{first_keys(missing) or 'no model.diffusion_model.* keys to name them'}")
    out = dict(state_dict)
    out.update({k: state_dict[ema_key(k)] for k in unet_keys})
    log.info("%s: using the EMA weights (model_ema.*) for the UNet", name)
    return out
