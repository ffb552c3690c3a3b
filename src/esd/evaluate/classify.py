"""ImageNet ResNet-50 (torchvision) top-1/top-5 for the imagenette suite, as in the ESD paper's object erasure.

The default weights are torchvision's `IMAGENET1K_V2` (what `ResNet50_Weights.DEFAULT` means), downloaded
once on the user's machine; `--classifier PATH` loads the same architecture from a local state-dict file
(e.g. the file torchvision itself caches, `resnet50-11ad3fa6.pth`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image

from esd.errors import EsdError

WEIGHTS_NAME = "IMAGENET1K_V2"


def _torchvision():
    try:
        import torchvision
    except ImportError as err:
        raise EsdError("the imagenette suite needs torchvision: pip install 'esd[eval]'") from err
    return torchvision


def load_resnet50(path: str | Path | None = None, device: torch.device | str = "cpu") -> torch.nn.Module:
    """ResNet-50 with ImageNet weights: from `path` (a state dict) or torchvision's download."""
    models = _torchvision().models
    if path is not None:
        model = models.resnet50(weights=None)
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state))
        except (OSError, RuntimeError, KeyError, AttributeError) as err:
            raise EsdError(f"--classifier {path}: not a torchvision ResNet-50 state dict ({err})") from err
    else:
        weights = models.ResNet50_Weights[WEIGHTS_NAME]
        print(f"loading torchvision ResNet-50 {WEIGHTS_NAME} weights ({weights.url}; downloaded once, then cached)",
              file=sys.stderr)
        try:
            model = models.resnet50(weights=weights)
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            raise EsdError(f"could not download the ResNet-50 {WEIGHTS_NAME} weights ({err}). Offline, download "
                           f"{weights.url} on a connected machine and pass it with --classifier PATH (or put it in "
                           f"{torch.hub.get_dir()}/checkpoints/)") from err
    return model.to(device).eval()


def imagenet_categories() -> list[str]:
    """The 1,000 ImageNet class names, as torchvision ships them (no download)."""
    return list(_torchvision().models.ResNet50_Weights[WEIGHTS_NAME].meta["categories"])


@torch.no_grad()
def top_k(model: torch.nn.Module, images: list[Image.Image], k: int = 5,
          batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, k) softmax probabilities and ImageNet class indices, best first, with the weights' own
    preprocessing (resize 232, centre crop 224)."""
    transform = _torchvision().models.ResNet50_Weights[WEIGHTS_NAME].transforms()
    device = next(model.parameters()).device
    probs, indices = [], []
    for i in range(0, len(images), batch_size):
        x = torch.stack([transform(image.convert("RGB")) for image in images[i : i + batch_size]]).to(device)
        top = model(x).softmax(-1).topk(k, dim=-1)
        probs.append(top.values.cpu())
        indices.append(top.indices.cpu())
    return torch.cat(probs), torch.cat(indices)


def own_class_rates(top: torch.Tensor, targets: list[int]) -> dict[str, float]:
    """Share of images whose own class is the top-1 prediction, and among the top 5."""
    target = torch.tensor(targets).unsqueeze(1)  # (N, 1)
    n = len(targets)
    return {"top1": (top[:, :1] == target).any(1).sum().item() / n if n else 0.0,
            "top5": (top[:, :5] == target).any(1).sum().item() / n if n else 0.0}
