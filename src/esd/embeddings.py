"""Embedding-level plumbing shared by the attacks (`esd attack`) and adversarial erasing (`esd erase --robust`):
token slots, injected embeddings, projection, the denoising loss and the prefix search (`search_prefix`).

Both attacks optimise vectors in the input space of the text encoder, the space of its token embedding table,
and read the erased UNet's denoising loss on images of the concept:

- UnlearnDiffAtk (Zhang et al. 2024, "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still
  Easy To Generate Unsafe Images ... For Now") optimises k prefix embeddings and projects each onto its nearest
  vocabulary token, so the result is a prompt made of real tokens;
- the textual-inversion attack (Pham et al. 2024, "Circumventing Concept Erasure Methods For Text-to-Image
  Generative Models") optimises one new token's embedding.

transformers' `CLIPTextModel.forward` takes `input_ids` only (no `inputs_embeds`: it needs the ids to find the
end-of-text token), so a vector enters the encoder through a forward hook on its token embedding layer: the
prompt is tokenized with placeholder ids at the *slots*, and the hook writes the vectors over those rows. The
encoder's output is what `pipe.encode_prompt` gives an SD1.x/SD2.x UNet (its last hidden state), so an attack
optimises exactly the conditioning the pipeline samples with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from esd.errors import EsdError

SLOT_ID = 0  # the id written at a slot; any real id works, the hook replaces its embedding


def token_embedding(text_encoder) -> torch.nn.Embedding:
    """The text encoder's token embedding layer (`text_model.embeddings.token_embedding` for CLIP)."""
    return text_encoder.get_input_embeddings()


def word_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without BOS/EOS. CLIP's BPE splits at spaces and punctuation first, so the ids of
    "a red" followed by those of "circle" are the ids of "a red circle"."""
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text.strip() else []


def slot_ids(tokenizer, before: str, n_slots: int, after: str = "") -> tuple[Tensor, Tensor]:
    """Ids (1, L) of BOS, `before`, `n_slots` slots, `after`, EOS and padding, padded as an SD pipeline pads
    prompts (L = the tokenizer's 77); and the mask (1, L), True at the slots. A long `after` is cut at the end,
    as the pipeline truncates; the slots always fit."""
    length = int(tokenizer.model_max_length)
    head, tail = word_ids(tokenizer, before), word_ids(tokenizer, after)
    room = length - 2 - n_slots - len(head)
    if room < 0:
        raise EsdError(f"the prompt {before!r} and {n_slots} attack tokens do not fit in {length} tokens")
    body = head + [SLOT_ID] * n_slots + tail[:room]
    ids = [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
    ids += [tokenizer.pad_token_id] * (length - len(ids))
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[0, 1 + len(head) : 1 + len(head) + n_slots] = True
    return torch.tensor([ids]), mask


@contextlib.contextmanager
def injected(text_encoder, mask: Tensor, vectors: Tensor) -> Iterator[None]:
    """Inside the block, the token embedding layer outputs `vectors` at the positions where `mask` (B, L) is True.

    `vectors` is (n, D), the same n vectors for every row, or (B, n, D); every row of `mask` has n True entries.
    Gradients flow from the encoder's output back to `vectors`.
    """
    layer = token_embedding(text_encoder)

    def hook(module, inputs, output: Tensor) -> Tensor:
        if output.shape[:2] != mask.shape:
            raise ValueError(f"slot mask {tuple(mask.shape)} does not match the token ids {tuple(output.shape[:2])}")
        rows = mask.to(output.device)
        source = vectors.to(output.dtype).to(output.device)
        if source.dim() == 2:
            source = source.expand(len(output), *source.shape)
        out = output.clone()
        out[rows] = source.reshape(-1, output.shape[-1])
        return out

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode(text_encoder, ids: Tensor, mask: Tensor | None = None, vectors: Tensor | None = None) -> Tensor:
    """Text conditioning (B, L, D) of token ids, with `vectors` at the `mask` slots: the encoder's last hidden
    state, what `pipe.encode_prompt` gives an SD1.x/SD2.x UNet."""
    device = next(text_encoder.parameters()).device
    ids = ids.to(device)
    if mask is None:
        return text_encoder(ids)[0]
    with injected(text_encoder, mask.expand(len(ids), -1), vectors):
        return text_encoder(ids)[0]


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module) -> Iterator[None]:
    """Every parameter of `modules` without gradients inside the block (only the attack's vectors learn)."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


# ------------------------------------------------------------------------------------------- vocabulary


@dataclass
class Vocabulary:
    """The real tokens an embedding may be projected onto: their ids and their unit-norm embeddings."""

    ids: Tensor  # (V',) token ids allowed
    unit: Tensor  # (V', D) their embeddings, unit norm

    @classmethod
    def of(cls, tokenizer, text_encoder, exclude: set[int] | frozenset = frozenset()) -> Vocabulary:
        """Every token of the tokenizer's own vocabulary but the special and added ones and `exclude`."""
        weight = token_embedding(text_encoder).weight.detach()
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        n = min(len(tokenizer.get_vocab()), weight.shape[0])
        ids = torch.tensor([i for i in range(n) if i not in special and i not in exclude])
        return cls(ids, F.normalize(weight[ids.to(weight.device)].float(), dim=-1))

    def nearest(self, vectors: Tensor) -> Tensor:
        """For each vector (n, D), the id of the allowed token with the highest cosine similarity."""
        sims = F.normalize(vectors.detach().float(), dim=-1).to(self.unit.device) @ self.unit.T
        return self.ids.to(sims.device)[sims.argmax(-1)].cpu()


def concept_token_ids(tokenizer, words: list[str]) -> set[int]:
    """Ids of the vocabulary tokens that spell one of `words` or a piece of at least 3 letters of one
    ("circle", "circles", "circ"), for attacks that must not simply say the concept."""
    words = [w.lower() for w in words if w]
    found = set()
    for token, i in tokenizer.get_vocab().items():
        text = token.replace("</w>", "").lower()
        if len(text) >= 3 and any(text in w or w in text for w in words):
            found.add(i)
    return found


def decode(tokenizer, ids: list[int]) -> str:
    """The text of token ids (CLIP ends a word with </w>, which decodes as a space)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()


# ---------------------------------------------------------------------------------------- the loss


@torch.no_grad()
def encode_images(vae, images: list[Image.Image]) -> Tensor:
    """VAE latents (N, C, h, w) of RGB images (the mean of the posterior, times the VAE's scaling factor)."""
    x = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 127.5 - 1.0
    pixels = torch.from_numpy(x).permute(0, 3, 1, 2).to(vae.device, vae.dtype)
    return vae.encode(pixels).latent_dist.mean * float(vae.config.scaling_factor)


def draw_noise(latents: Tensor, generator: torch.Generator, timesteps: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """A training timestep per latent, uniform over [low, high), and Gaussian noise, from a CPU generator."""
    t = torch.randint(timesteps[0], timesteps[1], (len(latents),), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    return t.to(latents.device), noise.to(latents.device, latents.dtype)


def training_target(scheduler, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """What the network learned to predict at `scheduler.add_noise(latents, noise, t)`: the noise for
    ε-prediction, the velocity for v-prediction, the clean latents for sample prediction."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    return latents if kind == "sample" else noise


def denoising_loss(unet, scheduler, latents: Tensor, embeds: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Mean squared error between the UNet's output at the noised latents and its target: the noise for
    ε-prediction, the velocity for v-prediction (the training loss of the model, on the attack's images)."""
    x_t = scheduler.add_noise(latents, noise, t)
    target = training_target(scheduler, latents, noise, t)
    embeds = embeds.expand(len(latents), *embeds.shape[1:]) if len(embeds) == 1 else embeds
    pred = unet(x_t, t, encoder_hidden_states=embeds.to(x_t.dtype)).sample
    return F.mse_loss(pred.float(), target.float())


@dataclass
class FixedDraws:
    """Timesteps and noise drawn once, so losses measured before and after an attack are comparable."""

    latents: Tensor
    t: Tensor
    noise: Tensor

    @classmethod
    def of(cls, latents: Tensor, seed: int, timesteps: tuple[int, int], repeats: int = 4) -> FixedDraws:
        rep = latents.repeat(repeats, 1, 1, 1)
        t, noise = draw_noise(rep, torch.Generator().manual_seed(seed), timesteps)
        return cls(rep, t, noise)

    @torch.no_grad()
    def loss(self, unet, scheduler, embeds: Tensor, batch_size: int = 16) -> float:
        """The denoising loss over every draw, in batches."""
        total = 0.0
        for i in range(0, len(self.latents), batch_size):
            part = slice(i, i + batch_size)
            e = embeds if len(embeds) == 1 else embeds[part]
            n = len(self.latents[part])
            total += float(denoising_loss(unet, scheduler, self.latents[part], e, self.t[part], self.noise[part])) * n
        return total / len(self.latents)


def search_prefix(text_encoder, ids: Tensor, mask: Tensor, init: Tensor, loss_of: Callable[[Tensor], Tensor],
                  steps: int, lr: float, straight_through: Vocabulary | None = None, weight_decay: float = 0.1,
                  progress: bool = False) -> tuple[Tensor, list[float]]:
    """The optimisation at the heart of UnlearnDiffAtk, shared by `esd attack` and `esd erase --robust`.

    Minimise `loss_of(conditioning)` over the prefix vectors (n, D) written at the `mask` slots of `ids`,
    starting from `init`, with AdamW. With `straight_through` each forward runs on the vectors' nearest tokens
    of that vocabulary while the gradient updates the continuous vectors; without it the vectors are free.
    Only the vectors get gradients (`torch.autograd.grad`), so a model being trained around this search (the
    robust erase) keeps its own `.grad` untouched. Returns the continuous vectors and the loss of every step.
    """
    vectors = init.detach().clone().float().requires_grad_(True)
    optimiser = torch.optim.AdamW([vectors], lr=lr, weight_decay=weight_decay)
    weight = token_embedding(text_encoder).weight
    losses = []
    for _ in tqdm(range(steps), desc="attack steps", disable=not progress, leave=False):
        used = vectors
        if straight_through is not None:
            hard = weight[straight_through.nearest(vectors).to(weight.device)].detach().float()
            used = vectors + (hard - vectors).detach()  # forward on the tokens, gradient to the embeddings
        loss = loss_of(encode(text_encoder, ids, mask, used))
        (vectors.grad,) = torch.autograd.grad(loss, [vectors])
        optimiser.step()
        losses.append(float(loss.detach()))
    return vectors.detach(), losses
