"""LPIPS (the `lpips` package, AlexNet variant) between two models' images of the same prompt and seed.

The ESD paper measures how far an erased model's images move from the original's with LPIPS: large for
the erased artist, small for the others. LPIPS' linear layers ship inside the `lpips` wheel; its AlexNet
backbone comes from torchvision's download, or from `--lpips-backbone PATH` (an AlexNet state dict such as
torchvision's cached `alexnet-owt-7be5be79.pth`).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from esd.errors import EsdError

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"


def load_lpips(backbone: str | Path | None = None, device: torch.device | str = "cpu") -> torch.nn.Module:
    """lpips.LPIPS(net='alex'): the backbone from `backbone` (a state dict) or torchvision's download."""
    try:
        import lpips
    except ImportError as err:
        raise EsdError("LPIPS needs the lpips package: pip install 'esd[eval]'") from err
    if backbone is None:
        print("loading LPIPS (AlexNet backbone downloaded once by torchvision, then cached)", file=sys.stderr)
        try:
            model = lpips.LPIPS(net="alex", verbose=False)
        except (OSError, RuntimeError) as err:
            raise EsdError(f"could not download LPIPS' AlexNet backbone ({err}). Offline, download "
                           f"{ALEXNET_FILE} (torchvision's AlexNet weights) and pass --lpips-backbone PATH "
                           f"(or put it in {torch.hub.get_dir()}/checkpoints/)") from err
    else:
        with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)  # random backbone, replaced below
        _load_alexnet_features(model, backbone)
    return model.to(device).eval()


def _load_alexnet_features(model: torch.nn.Module, path: str | Path) -> None:
    """Copy `features.*` of an AlexNet state dict into LPIPS' slices (they hold the same layers, split)."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as err:
        raise EsdError(f"--lpips-backbone {path}: not a readable state dict ({err})") from err
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    # LPIPS names each layer of a slice by its index in torchvision's `alexnet().features`.
    layers = {name: layer for s in range(1, 6) for name, layer in getattr(model.net, f"slice{s}").named_children()}
    expected = {f"{name}.{p}" for name, layer in layers.items() for p, _ in layer.named_parameters()}
    if not expected <= features.keys():
        raise EsdError(f"--lpips-backbone {path}: not an AlexNet state dict (missing e.g. "
                       f"features.{sorted(expected - features.keys())[0]})")
    with torch.no_grad():
        for name, layer in layers.items():
            for p_name, param in layer.named_parameters():
                param.copy_(features[f"{name}.{p_name}"])


def _to_tensor(images: list[Image.Image], size: tuple[int, int]) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1], as LPIPS expects."""
    arrays = [np.asarray(im.convert("RGB").resize(size, Image.BICUBIC), dtype=np.float32) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


@torch.no_grad()
def lpips_distances(model: torch.nn.Module, a: list[Image.Image], b: list[Image.Image],
                    batch_size: int = 16) -> list[float]:
    """LPIPS of each pair (a[i], b[i]); b is resized to a's size when they differ."""
    device = next(model.parameters()).device
    out: list[float] = []
    for i in range(0, len(a), batch_size):
        size = a[i].size
        x = _to_tensor(a[i : i + batch_size], size).to(device)
        y = _to_tensor(b[i : i + batch_size], size).to(device)
        out += model(x, y).flatten().tolist()
    return out
