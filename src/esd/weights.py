"""ESD weight files and atomic writes.

An ESD weights file (`esd.safetensors`) holds only the trained UNet parameters, under their diffusers
names, with the run's config in the safetensors metadata. Applying one checks every name and shape
against the UNet first, so a file made for another base model is an error, never a partial load.

Every file the project writes goes through `atomic_path`: a reader (or a crash) sees the old file or
the new one, never half of one. This module needs no model loader, so the CompVis converter, the
evaluation code and the trainer can all use it without importing each other.
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
