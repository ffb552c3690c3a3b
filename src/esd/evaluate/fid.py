"""FID (torchmetrics) between generated images and a reference folder of real images.

Feature extractor: torchmetrics' InceptionV3 port of the original TensorFlow FID network (via
torch-fidelity), pool3 features (2048). Its weights are downloaded once on the user's machine;
`--inception PATH` points at a local copy of that file (`weights-inception-2015-12-05-6726825d.pth`).
Every image, generated or real, is centre-cropped to a square and resized to 299 px with PIL's
antialiased bicubic filter before it is fed as uint8 (the resize clean-fid recommends over a tensor resize).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from esd.errors import EsdError

FID_SIZE = 299
MIN_IMAGES = 2  # a covariance needs two samples; far more (thousands) are needed for a stable number
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def inception_extractor(path: str | Path | None = None) -> torch.nn.Module:
    """torchmetrics' FID InceptionV3 (2048-d pool features), from `path` or its download."""
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as err:
        raise EsdError("FID needs torchmetrics and torch-fidelity: pip install 'esd[eval]'") from err
    if path is None:
        print("loading the FID InceptionV3 weights (downloaded once by torch-fidelity, then cached)", file=sys.stderr)
    elif not Path(path).is_file():
        raise EsdError(f"--inception {path}: no such file")
    try:
        return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                  feature_extractor_weights_path=None if path is None else str(path))
    except (OSError, RuntimeError) as err:
        raise EsdError(f"could not load the FID InceptionV3 weights ({err}). Offline, download {INCEPTION_FILE} "
                       f"(torch-fidelity's release files) on a connected machine and pass --inception PATH (or put it "
                       f"in {torch.hub.get_dir()}/checkpoints/)") from err


def fid_tensor(images: list[Image.Image], size: int = FID_SIZE) -> torch.Tensor:
    """(N, 3, size, size) uint8: centre square crop, bicubic resize."""
    out = []
    for image in images:
        image = image.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        out.append(np.asarray(image, dtype=np.uint8))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def frechet_distance(generated: list[Image.Image], reference: list[Image.Image], extractor: torch.nn.Module,
                     batch_size: int = 32) -> float:
    """FID between two image lists with the given feature extractor (uint8 (N, 3, H, W) -> (N, D))."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    for name, images in (("generated", generated), ("reference", reference)):
        if len(images) < MIN_IMAGES:
            raise EsdError(f"FID needs at least {MIN_IMAGES} {name} images, got {len(images)}")
    device = next(extractor.parameters()).device
    metric = FrechetInceptionDistance(feature=extractor, normalize=False).to(device)
    # torchmetrics accumulates the feature sums and covariances in float64 itself
    for images, real in ((reference, True), (generated, False)):
        for i in range(0, len(images), batch_size):
            metric.update(fid_tensor(images[i : i + batch_size]).to(device), real=real)
    return float(metric.compute())
