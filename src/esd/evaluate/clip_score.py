"""CLIP (transformers) for two measurements: CLIP score (prompt-image agreement) and artist identification.

CLIP score follows Hessel et al. 2021 as torchmetrics does: 100 * max(cos(image, text), 0). Artist
identification is zero-shot: each image goes to the artist whose "a painting in the style of {artist}"
text is closest. Images are preprocessed as OpenAI's CLIP does (bicubic resize of the short side, centre
crop, CLIP mean/std), in numpy, so no torchvision is needed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from esd.errors import EsdError

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ARTIST_TEMPLATE = "a painting in the style of {}"


@dataclass
class Clip:
    model: torch.nn.Module  # transformers CLIPModel
    tokenizer: object  # CLIPTokenizer
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)


def load_clip(name_or_path: str = DEFAULT_CLIP, device: torch.device | str = "cpu") -> Clip:
    """A CLIPModel from a local folder or the hub; the tokenizer from the same place, else the shipped one."""
    from transformers import CLIPModel, CLIPTokenizer

    from esd.tokenizer import clip_tokenizer

    if not Path(name_or_path).exists():
        print(f"loading CLIP {name_or_path} from the Hugging Face hub (downloaded once, then cached)", file=sys.stderr)
    try:
        model = CLIPModel.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise EsdError(f"--clip-model {name_or_path}: could not load it ({err}). Offline, download it on a "
                       f"connected machine (e.g. `hf download {DEFAULT_CLIP}`) and pass the local folder "
                       "with --clip-model PATH") from err
    try:
        tokenizer = CLIPTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, TypeError):
        tokenizer = clip_tokenizer()  # OpenAI's CLIP BPE, the same vocabulary every CLIP uses
    return Clip(model.to(device).eval(), tokenizer, name_or_path)


def preprocess(images: list[Image.Image], size: int) -> torch.Tensor:
    """(N, 3, size, size) CLIP input: bicubic resize of the short side, centre crop, CLIP normalisation."""
    batch = []
    for image in images:
        w, h = image.size
        scale = size / min(w, h)
        image = image.convert("RGB").resize((max(size, round(w * scale)), max(size, round(h * scale))),
                                            Image.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        batch.append((np.asarray(image, dtype=np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD)
    return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float()


@torch.no_grad()
def image_embeddings(clip: Clip, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
    """Unit-norm image embeddings (N, D)."""
    out = []
    for i in range(0, len(images), batch_size):
        pixels = preprocess(images[i : i + batch_size], clip.image_size).to(clip.device)
        out.append(_as_tensor(clip.model.get_image_features(pixel_values=pixels)))
    return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1).cpu()


@torch.no_grad()
def text_embeddings(clip: Clip, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Unit-norm text embeddings (N, D); texts longer than CLIP's 77 tokens are truncated, as in CLIP."""
    out = []
    max_length = int(clip.model.config.text_config.max_position_embeddings)
    for i in range(0, len(texts), batch_size):
        tokens = clip.tokenizer(texts[i : i + batch_size], padding="max_length", truncation=True,
                                max_length=max_length, return_tensors="pt").to(clip.device)
        out.append(_as_tensor(clip.model.get_text_features(input_ids=tokens["input_ids"],
                                                           attention_mask=tokens["attention_mask"])))
    return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1).cpu()


def _as_tensor(features) -> torch.Tensor:
    # transformers 5 may return a model output with the projected embeddings in `pooler_output`.
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def clip_scores(clip: Clip, images: list[Image.Image], texts: list[str]) -> list[float]:
    """Per-image CLIP score 100 * max(cos, 0) against its own text."""
    cos = (image_embeddings(clip, images) * text_embeddings(clip, texts)).sum(-1)
    return (100 * cos.clamp(min=0)).tolist()


def identify(clip: Clip, images: list[Image.Image], candidates: list[str],
             template: str = ARTIST_TEMPLATE) -> list[str]:
    """Zero-shot: for each image, the candidate whose `template.format(candidate)` text is closest."""
    sims = image_embeddings(clip, images) @ text_embeddings(clip, [template.format(c) for c in candidates]).T
    return [candidates[i] for i in sims.argmax(-1).tolist()]
