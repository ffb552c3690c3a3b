"""UnlearnDiffAtk: an adversarial text prefix that makes an erased model draw the concept again.

Zhang et al. 2024, "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy To Generate
Unsafe Images ... For Now". The erased model itself is the attacker's classifier: for a prompt p and images
x_0 of the concept made by the original model, find k prefix tokens δ such that the erased model, prompted
with [δ, p], denoises x_0 well,

    min_δ  E_{t, ε} || ε_θ(x_t, t, [δ, p]) − ε ||²,   x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε,

since a model that denoises the concept's images under a prompt generates them from it. δ lives in the
vocabulary, a discrete set; as in the paper's implementation the relaxation keeps k continuous embeddings
and, with `projection="every-step"` (the default), runs every forward pass on their nearest vocabulary tokens
while the gradient updates the continuous ones (a straight-through estimator). `projection="end"` optimises
the continuous embeddings freely and projects once at the end. Either way the result is real tokens, a text
prompt that is judged as text: generated from with the erased model and shown to the suite's judge.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from esd.embeddings import (
    FixedDraws,
    Vocabulary,
    decode,
    denoising_loss,
    draw_noise,
    encode,
    frozen,
    search_prefix,
    slot_ids,
    token_embedding,
)

PROJECTIONS = ("every-step", "end")


@dataclass
class PrefixResult:
    """What one prompt's attack found, and what it cost."""

    token_ids: list[int]
    tokens: list[str]  # each token as the vocabulary spells it (CLIP: "circle</w>")
    prefix: str  # the tokens as text
    losses: list[float] = field(default_factory=list)  # the loss each optimisation step descended
    loss_plain: float | None = None  # the prompt alone, on fixed timesteps and noise
    loss_start: float | None = None  # the initial prefix (real tokens)
    loss_embedding: float | None = None  # the optimised continuous embeddings
    loss_found: float | None = None  # the projected tokens: the prompt that is judged
    seconds: float = 0.0


def attacked_prompt(prefix: str, prompt: str) -> str:
    """The found prompt: the prefix's text before the prompt's."""
    return f"{prefix} {prompt}".strip()


def optimise_prefix(pipe, prompt: str, latents: Tensor, n_tokens: int = 5, steps: int = 40, lr: float = 0.01,
                    seed: int = 0, vocabulary: Vocabulary | None = None, projection: str = "every-step",
                    weight_decay: float = 0.1, timesteps: tuple[int, int] | None = None, draws: int = 2,
                    progress: bool = False) -> PrefixResult:
    """Optimise `n_tokens` prefix embeddings before `prompt` so the pipeline's (erased) UNet denoises `latents`
    (the original model's images of the concept, VAE latents) well; return their projection onto `vocabulary`.

    AdamW with decoupled weight decay on the embeddings; each step draws `draws` timesteps in `timesteps`
    (default: the whole schedule) and noises per image. The initial prefix is `n_tokens` random vocabulary
    tokens, drawn like everything else from `seed`.
    """
    if projection not in PROJECTIONS:
        raise ValueError(f"projection {projection!r}: choose one of {PROJECTIONS}")
    start = time.perf_counter()
    tokenizer, text_encoder, unet, scheduler = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.scheduler
    vocabulary = vocabulary or Vocabulary.of(tokenizer, text_encoder)
    weight = token_embedding(text_encoder).weight
    generator = torch.Generator().manual_seed(seed)
    first = vocabulary.ids[torch.randint(len(vocabulary.ids), (n_tokens,), generator=generator)]
    start_vectors = weight[first.to(weight.device)].detach().float()
    ids, mask = slot_ids(tokenizer, "", n_tokens, prompt)
    plain_ids, _ = slot_ids(tokenizer, "", 0, prompt)
    T = timesteps or (0, int(scheduler.config.num_train_timesteps))
    fixed = FixedDraws.of(latents, seed + 1, T)

    def loss_of(embeds: Tensor) -> Tensor:  # the erased model's denoising loss on the concept's images
        batch = latents.repeat(draws, 1, 1, 1)
        t, noise = draw_noise(batch, generator, T)
        return denoising_loss(unet, scheduler, batch, embeds, t, noise)

    result = PrefixResult([], [], "")
    with frozen(text_encoder, unet):
        with torch.no_grad():
            result.loss_plain = fixed.loss(unet, scheduler, encode(text_encoder, plain_ids))
            result.loss_start = fixed.loss(unet, scheduler, encode(text_encoder, ids, mask, start_vectors))
        through = vocabulary if projection == "every-step" else None
        vectors, result.losses = search_prefix(text_encoder, ids, mask, start_vectors, loss_of, steps, lr, through,
                                               weight_decay, progress)
        chosen = vocabulary.nearest(vectors)
        hard = weight[chosen.to(weight.device)].detach().float()
        with torch.no_grad():
            result.loss_embedding = fixed.loss(unet, scheduler, encode(text_encoder, ids, mask, vectors))
            result.loss_found = fixed.loss(unet, scheduler, encode(text_encoder, ids, mask, hard))
    result.token_ids = [int(i) for i in chosen]
    result.tokens = tokenizer.convert_ids_to_tokens(result.token_ids)
    result.prefix = decode(tokenizer, result.token_ids)
    result.seconds = time.perf_counter() - start
    return result
