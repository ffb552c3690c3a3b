"""What an evaluation result must carry to be reproducible: package versions and file hashes.

The erasure repositories' evaluation numbers often cannot be reproduced because the NudeNet version,
the threshold or the exact model file were never written down; every `metrics.json` records them.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

# Packages whose version can change an evaluation number.
VERSIONED_PACKAGES = ("esd", "torch", "torchvision", "diffusers", "transformers", "nudenet", "onnxruntime",
                      "torchmetrics", "torch-fidelity", "lpips", "numpy", "pillow")
WEIGHT_SUFFIXES = {".safetensors", ".ckpt", ".bin", ".pt", ".pth", ".onnx"}


def package_versions(names: tuple[str, ...] = VERSIONED_PACKAGES) -> dict[str, str | None]:
    """Installed version of each package, None when it is not installed."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of one file, read in 1 MiB chunks so a 4 GB checkpoint needs no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _hub_snapshot(model: str) -> Path | None:
    """The local cache folder of a hub model that was already downloaded, without any network call."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached or not a hub id: nothing to hash
        return None


def model_hashes(model: str | None) -> dict[str, str]:
    """sha256 of the weight files of a model: a single file, a diffusers folder, or a cached hub id."""
    if model is None:
        return {}
    path = Path(model).expanduser()
    if not path.exists():
        path = _hub_snapshot(model) or path
    if path.is_file():
        return {path.name: sha256_file(path)}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
        return {str(p.relative_to(path)): sha256_file(p) for p in files}
    return {}


def unet_sha256(model: str | None) -> str | None:
    """sha256 of the file that holds a model's UNet: the model itself when it is a single file, else the UNet
    weights of a diffusers folder (or of an already downloaded hub id), `unet/diffusion_pytorch_model.*`;
    None when there is none to hash."""
    if model is None:
        return None
    path = Path(model).expanduser()
    if not path.exists():
        path = _hub_snapshot(model) or path
    if path.is_file():
        return sha256_file(path)
    weights = sorted((p for p in (path / "unet").glob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES),
                     key=lambda p: (p.suffix != ".safetensors", p.name))  # diffusers loads safetensors first
    return sha256_file(weights[0]) if weights else None
