"""ESD weight files and atomic writes.

An ESD weights file (`esd.safetensors`) holds only the trained UNet parameters, under their diffusers
names, with the run's config in the safetensors metadata. Applying one checks every name and shape
against the UNet first, so a file made for another base model is an error, never a partial load.

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
    """Read an ESD weights file; errors name the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise EsdError(f"--weights {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise EsdError(f"--weights {path}: not a readable safetensors file ({err})") from err
    return tensors, metadata


def apply_esd_weights(unet: torch.nn.Module, path: str | Path) -> dict[str, str]:
    """Load an ESD weights file into `unet` in place, after checking every name and shape."""
    tensors, metadata = load_esd_weights(path)
    own = dict(unet.named_parameters())
    unknown = [k for k in tensors if k not in own]
    if unknown:
        raise EsdError(f"--weights {path}: {len(unknown)} tensors are not parameters of this UNet, e.g. "
                       f"{unknown[:3]}; was it made for another base model?")
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in tensors.items() if v.shape != own[k].shape]
    if wrong:
        raise EsdError(f"--weights {path}: shapes differ from this UNet's: {wrong[:3]}")
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value.to(own[name].dtype))
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
def applied_weights(unet: torch.nn.Module, path: str | Path) -> Iterator[dict[str, str]]:
    """The UNet with an ESD weights file applied inside the block, and its own values again after it."""
    with safe_open(str(path), framework="pt") as f:  # names only; apply_esd_weights reads and checks the tensors
        names = list(f.keys())
    own = dict(unet.named_parameters())
    saved = snapshot_parameters(unet, [n for n in names if n in own])  # unknown names are refused by apply below
    try:
        yield apply_esd_weights(unet, path)
    finally:
        restore_parameters(unet, saved)
