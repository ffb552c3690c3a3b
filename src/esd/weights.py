"""ESD weight files and atomic writes.

An ESD weights file (`esd.safetensors`) holds only the trained parameters of the denoising network (UNet, or
SD3/FLUX transformer) under their diffusers names, and with `--train-text-encoder` the trained text-encoder
parameters under `text_encoder.<name>` (the pipeline's attribute, as diffusers names a pipeline's parts), with
the run's config in the safetensors metadata. Applying one checks every name, dtype, shape
and value (finite) first, so a file made for another base model, or a damaged one, is an error, never a
partial load.

Every file the project writes goes through `atomic_path`: a reader (or a crash) sees the old file or
the new one, never half of one. This module needs no model loader, so the CompVis converter, the
evaluation code and the trainer can all use it without importing each other.

`snapshot_parameters`/`restore_parameters` and `applied_weights` let one loaded UNet serve as both the
original and an erased model (the app): a weights file is applied for a block and the UNet's own values
are put back after it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from esd.errors import EsdError

WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # what a weights file may hold


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_esd_weights(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    """Write the trained parameters (diffusers UNet names) as safetensors, atomically."""
    data = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    return Path(path)


def load_esd_weights(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read an ESD weights file; errors name the file and what is wrong with it.

    Only safetensors is read (no pickle), and every tensor must be a finite floating-point array: the file
    holds trained UNet parameters and nothing else.
    """
    path = Path(path)
    if path.is_dir():
        raise EsdError(f"--weights {path}: a folder, not a weights file")
    if not path.is_file():
        raise EsdError(f"--weights {path}: {'not a regular file' if path.exists() else 'no such file'}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as err:
        raise EsdError(f"--weights {path}: not a readable safetensors file ({err})") from err
    if not tensors:
        raise EsdError(f"--weights {path}: holds no tensors")
    odd = [f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in tensors.items() if v.dtype not in WEIGHT_DTYPES]
    if odd:
        raise EsdError(f"--weights {path}: {len(odd)} tensors of a dtype UNet parameters do not have "
                       f"(float32, float16, bfloat16 or float64), e.g. {odd[:3]}")
    not_finite = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
    if not_finite:
        raise EsdError(f"--weights {path}: NaN or infinite values in {len(not_finite)} tensors, e.g. {not_finite[:3]}")
    return tensors, metadata


def _check_fits(unet: torch.nn.Module, tensors: dict[str, Tensor], path: str | Path) -> dict[str, torch.nn.Parameter]:
    """The module's parameters, after checking that every tensor names one of them with its shape."""
    own, kind = dict(unet.named_parameters()), type(unet).__name__
    unknown = [k for k in tensors if k not in own]
    if unknown:
        raise EsdError(f"--weights {path}: {len(unknown)} tensors are not parameters of this {kind}, e.g. "
                       f"{unknown[:3]}; was it made for another base model?")
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in tensors.items() if v.shape != own[k].shape]
    if wrong:
        raise EsdError(f"--weights {path}: shapes differ from this {kind}'s: {wrong[:3]}")
    return own


@torch.no_grad()
def _copy_into(own: dict[str, torch.nn.Parameter], tensors: dict[str, Tensor]) -> None:
    for name, value in tensors.items():
        own[name].copy_(value.to(own[name].dtype))


def full_tensors(unet: torch.nn.Module, tensors: dict[str, Tensor], metadata: dict[str, str],
                 path: str | Path) -> dict[str, Tensor]:
    """The parameters a weights file sets: its tensors, or for a LoRA file (`--lora-rank`) the merged weights."""
    from esd.lora import is_lora, merged_weights

    if not is_lora(tensors):
        return tensors
    scale = float(metadata.get("lora_alpha", 1)) / float(metadata.get("lora_rank", 1))
    return merged_weights(unet, tensors, scale, path)


TEXT_ENCODER = "text_encoder."  # the prefix of text-encoder tensors in a weights file (--train-text-encoder)


def split_text_encoder(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(the denoising network's tensors, the text encoder's under their own names). No diffusers UNet or
    transformer parameter name starts with `text_encoder.`, so the prefix is unambiguous."""
    net = {k: v for k, v in tensors.items() if not k.startswith(TEXT_ENCODER)}
    text = {k[len(TEXT_ENCODER):]: v for k, v in tensors.items() if k.startswith(TEXT_ENCODER)}
    return net, text


def has_text_encoder_delta(path: str | Path) -> bool:
    """Whether a weights file holds text-encoder tensors (an erase with --train-text-encoder)."""
    tensors, _ = load_esd_weights(path)
    return any(k.startswith(TEXT_ENCODER) for k in tensors)


def _targets(target, tensors: dict[str, Tensor], metadata: dict[str, str], path) -> list[tuple[torch.nn.Module, dict]]:
    """[(module, the tensors it takes)]: for a pipeline its denoising network, and its text encoder when the file
    holds a text-encoder delta; for a bare UNet/transformer the network alone (a file with a text-encoder delta
    is then an error: applying half of an erase would draw the concept again). Every name, dtype and shape is
    checked before anything is written."""
    from esd.networks import network

    net_tensors, text_tensors = split_text_encoder(tensors)
    bare = isinstance(target, torch.nn.Module)
    if bare and text_tensors:
        raise EsdError(f"--weights {path}: holds a text-encoder delta as well; apply it to the whole pipeline")
    pipe, net = (None, target) if bare else (target, network(target))
    pairs = [(net, full_tensors(net, net_tensors, metadata, path))]
    if text_tensors:
        encoder = getattr(pipe, "text_encoder", None)
        if encoder is None:
            raise EsdError(f"--weights {path}: holds a text-encoder delta, but this pipeline has no text_encoder")
        pairs.append((encoder, text_tensors))
    for module, part in pairs:
        _check_fits(module, part, path)
    return pairs


def apply_esd_weights(target, path: str | Path) -> dict[str, str]:
    """Load an ESD weights file in place, after checking every name, dtype and shape.

    `target` is a pipeline (its denoising network, and its text encoder when the file holds a
    `--train-text-encoder` delta) or a bare UNet/transformer (a file with a text-encoder delta is then an error:
    applying half of an erase would draw the concept again).
    """
    tensors, metadata = load_esd_weights(path)
    for module, part in _targets(target, tensors, metadata, path):
        _copy_into(dict(module.named_parameters()), part)
    return metadata


def snapshot_parameters(unet: torch.nn.Module, names: list[str]) -> dict[str, Tensor]:
    """CPU copies of the named parameters, to put back later."""
    return {name: unet.get_parameter(name).detach().to("cpu", copy=True) for name in names}


@torch.no_grad()
def restore_parameters(unet: torch.nn.Module, saved: dict[str, Tensor]) -> None:
    """Put saved values back and drop gradients left by training."""
    for name, value in saved.items():
        param = unet.get_parameter(name)
        param.copy_(value.to(param.device, param.dtype))
        param.grad = None


@contextlib.contextmanager
def applied_weights(target, path: str | Path) -> Iterator[dict[str, str]]:
    """A pipeline (or a bare UNet/transformer) with an ESD weights file applied inside the block (its denoising
    network, and its text encoder for a file with a text-encoder delta), and its own values again after it."""
    tensors, metadata = load_esd_weights(path)  # the file is read once and checked before anything changes
    pairs = _targets(target, tensors, metadata, path)
    saved = [(module, snapshot_parameters(module, list(part))) for module, part in pairs]
    try:
        for module, part in pairs:
            _copy_into(dict(module.named_parameters()), part)
        yield metadata
    finally:
        for module, values in saved:
            restore_parameters(module, values)
