"""A small CNN that labels testbed images with a shape, a colour and a fill style: the judge of erasure experiments.

Three heads over a shared convolutional trunk. Each head also has a "none" class, trained on empty
backgrounds, so that an image whose shape was erased is not forced into some shape by chance.
Trained on fresh renders with blur, noise and colour jitter, so it stays reliable on generated images,
which are softer and noisier than renders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from esd.errors import EsdError
from esd.testbed.render import COLOURS, FILLS, SHAPES, SIZE, render_batch, render_shape

SHAPE_LABELS = (*SHAPES, "none")
COLOUR_LABELS = (*COLOURS, "none")
STYLE_LABELS = (*FILLS, "none")


class Prediction(NamedTuple):
    """The classifier's verdict on one image, with the probability of each label."""

    shape: str
    colour: str
    shape_prob: float
    colour_prob: float
    style: str = "none"
    style_prob: float = 0.0


class ShapeColourNet(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4 px) and three linear heads: shape, colour and style logits."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.trunk = nn.Sequential(stage(3, w), stage(w, 2 * w), stage(2 * w, 4 * w), nn.Flatten())
        # Flatten rather than global pooling: where the edges sit relative to each other tells the shapes apart.
        self.hidden = nn.Sequential(nn.Linear(4 * w * (SIZE // 8) ** 2, 128), nn.ReLU())
        self.shape_head = nn.Linear(128, len(SHAPE_LABELS))
        self.colour_head = nn.Linear(128, len(COLOUR_LABELS))
        self.style_head = nn.Linear(128, len(STYLE_LABELS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, 3, 32, 32) in [0, 1] -> shape logits (B, 4), colour logits (B, 5), style logits (B, 5)."""
        h = self.hidden(self.trunk(x - 0.5))
        return self.shape_head(h), self.colour_head(h), self.style_head(h)


class Classifier:
    """A loaded `ShapeColourNet` with its labels: `classify(images)` -> one `Prediction` per image."""

    def __init__(self, net: ShapeColourNet, device: str = "cpu"):
        self.net = net.to(device).eval()
        self.device = device

    @torch.no_grad()
    def probabilities(self, images: list[Image.Image], batch_size: int = 256) -> tuple[torch.Tensor, ...]:
        """Softmax probabilities over SHAPE_LABELS (N, 4), COLOUR_LABELS (N, 5) and STYLE_LABELS (N, 5)."""
        probs = []
        for i in range(0, len(images), batch_size):
            x = pil_to_tensor(images[i : i + batch_size]).to(self.device)
            probs.append([logits.softmax(-1).cpu() for logits in self.net(x)])
        return tuple(torch.cat(head) for head in zip(*probs, strict=True))

    def classify(self, images: list[Image.Image]) -> list[Prediction]:
        """The most likely shape, colour and style of each image (32x32 RGB; other sizes are resized)."""
        shape_p, colour_p, style_p = self.probabilities(images)
        out = []
        for sp, cp, yp in zip(shape_p, colour_p, style_p, strict=True):
            s, c, y = int(sp.argmax()), int(cp.argmax()), int(yp.argmax())
            out.append(Prediction(SHAPE_LABELS[s], COLOUR_LABELS[c], float(sp[s]), float(cp[c]),
                                  STYLE_LABELS[y], float(yp[y])))
        return out


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (N, 3, 32, 32) float in [0, 1]."""
    arrays = [
        np.asarray(
            im.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR) if im.size != (SIZE, SIZE) else im.convert("RGB")
        )
        for im in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def load_classifier(path: str | Path, device: str = "cpu") -> Classifier:
    """Load `<path>/model.safetensors` + `<path>/config.json` as written by `train_classifier`."""
    path = Path(path)
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise EsdError(
            f"no testbed classifier at {path} (expected model.safetensors and config.json); it ships in "
            "models/testbed/classifier/ of the repository, and `esd testbed train --output DIR` writes DIR/classifier/"
        )
    config = json.loads((path / "config.json").read_text())
    found = (config["shape_labels"], config["colour_labels"], config.get("style_labels"))
    if found[2] is None or tuple(map(tuple, found)) != (SHAPE_LABELS, COLOUR_LABELS, STYLE_LABELS):
        raise EsdError(
            f"classifier at {path} has labels {found}, expected {SHAPE_LABELS} / {COLOUR_LABELS} / {STYLE_LABELS}; "
            "retrain it with `esd testbed train` (a first-generation testbed's classifier has no style head)"
        )
    net = ShapeColourNet(width=config["width"])
    net.load_state_dict(load_file(path / "model.safetensors"))
    return Classifier(net, device)


# ----------------------------------------------------------------------------- training


def render_labelled(n: int, rng: np.random.Generator, p_blank: float = 0.05) -> tuple[torch.Tensor, ...]:
    """`n` renders (N, 3, 32, 32) in [0, 1] with (N, 3) shape, colour, style label indices; a share are empty ("none")."""
    images, shapes, colours, styles = render_batch(n, rng, p_solid=0.25)  # every fill equally often
    blank = rng.random(n) < p_blank
    for i in np.flatnonzero(blank):
        images[i] = render_shape(None, None, rng)
    shapes[blank], colours[blank], styles[blank] = len(SHAPES), len(COLOURS), len(FILLS)  # the "none" labels
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return x, torch.from_numpy(np.stack([shapes, colours, styles], axis=1))


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Make renders look like generated images: partial blur, colour/brightness jitter, pixel noise."""
    b = x.shape[0]

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(b, *shape, generator=g)).to(x.device)

    k = torch.tensor([0.25, 0.5, 0.25], device=x.device)
    kernel = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    x = torch.lerp(x, blurred, u(0, 1, 1, 1, 1))
    x = x * u(0.9, 1.1, 1, 1, 1) + u(-0.05, 0.05, 3, 1, 1)
    x = x + u(0, 0.06, 1, 1, 1) * torch.randn(x.shape, generator=g).to(x.device)
    return x.clamp(0, 1)


@torch.no_grad()
def accuracy(net: ShapeColourNet, x: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Share of images with the right shape, colour and style, each, and all three."""
    ok = torch.stack([logits.argmax(-1).cpu() == labels[:, k] for k, logits in enumerate(net(x))], dim=1)
    return {
        "accuracy": float(ok.all(1).float().mean()),
        "shape_accuracy": float(ok[:, 0].float().mean()),
        "colour_accuracy": float(ok[:, 1].float().mean()),
        "style_accuracy": float(ok[:, 2].float().mean()),
    }


def train_classifier(
    out_dir: str | Path,
    seed: int = 0,
    steps: int = 2000,
    device: str = "cpu",
    batch_size: int = 128,
    pool_size: int = 20_000,
    width: int = 32,
) -> Path:
    """Train on a pool of renders (augmented anew every step), test on fresh renders, save safetensors + config.json."""
    torch.manual_seed(seed)
    net = ShapeColourNet(width).to(device)
    x, labels = render_labelled(pool_size, np.random.default_rng([seed, 2]))
    x, labels_d = x.to(device), labels.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="classifier", dynamic_ncols=True):
        idx = torch.randint(len(x), (batch_size,), generator=g).to(device)
        heads = net(augment(x[idx], g))
        loss = sum(F.cross_entropy(logits, labels_d[idx, k]) for k, logits in enumerate(heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    x_test, labels_test = render_labelled(2000, np.random.default_rng([seed, 3]), p_blank=0.0)
    metrics = accuracy(net, x_test.to(device), labels_test)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, out / "model.safetensors")
    config = {
        "width": width,
        "shape_labels": list(SHAPE_LABELS),
        "colour_labels": list(COLOUR_LABELS),
        "style_labels": list(STYLE_LABELS),
        "seed": seed,
        "steps": steps,
        **metrics,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
