"""Adversarial erasing (`esd erase --robust`) and a trained text encoder (`--train-text-encoder`).

AdvUnlearn (Zhang et al. 2024, "Defensive Unlearning with Adversarial Training for Robust Concept Erasure in
Diffusion Models") wraps the erase in a min-max problem,

    min_θ  ℓ_ESD(θ, c) + ℓ_ESD(θ, [δ*, c]) + γ ℓ_retain(θ),    δ* = argmin_δ ‖ε_θ(x_t, [δ, c], t) − ε*(x_t, c, t)‖²,

where ℓ_ESD is the Eq. 5 loss and δ are k prefix embeddings. The inner problem is an attack on the model being
trained: a prefix under which the erased model predicts, at the example's own x_t, what the original model
predicts for the concept, i.e. under which the concept is back. It is solved approximately by a few steps of the
UnlearnDiffAtk search (`esd.embeddings.search_prefix`, the code `esd attack` runs), warm-started from the
previous prefix of the same example stream, so the adversary keeps up with θ instead of starting over. With
`--robust-adversary word` the embedding takes the concept word's place in its phrasing instead ("a red δ", the
textual-inversion attack's form), a search over every way of naming the concept without its word. The
embeddings are free (not projected to tokens): a continuous prefix is a stronger adversary than any typed one,
and the textual-inversion attack is a continuous embedding too. γ ℓ_retain is `--retain`/`--retain-weight`.

Both adversaries work at x_t the sampler made, which after a few iterations no longer shows the concept. The
textual-inversion attack (`esd attack --attack textual-inversion`) works elsewhere: at the original model's images
of the concept, noised at any timestep, where it finds a word under which the erased UNet still denoises them.
`--robust-adversary inversion` fits its embedding there, with the same objective (STEREO, Srivatsan et al. 2024,
searches the same way), and the erase term then trains on those noised images too: Eq. 5's target at x_t' =
√ᾱ_t' x_0 + √(1−ᾱ_t') ε, for x_0 a bank of `--robust-images` images the original model made at setup.

`--train-text-encoder` adds the text encoder's transformer layers to θ, as AdvUnlearn trains them. Then the
frozen model's conditioning is still the original encoder's (encoded once, before training), while the model
being trained samples x_t and predicts with its own, re-encoded every iteration (`TextConds`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from esd.embeddings import Vocabulary, encode, search_prefix, slot_ids, token_embedding, training_target
from esd.networks import Cond
from esd.sampling import Denoiser, ddim_states
from esd.weights import TEXT_ENCODER


def text_encoder_params(text_encoder: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """θ's text-encoder part, named as in a weights file (`text_encoder.<name>`): every parameter but the token
    and position embeddings, which stay the original's (the attacks' vocabulary, and a delta of the layers only).
    The rest of the encoder is frozen."""
    params = {}
    for name, p in text_encoder.named_parameters():
        p.requires_grad_(".embeddings." not in f".{name}")
        if p.requires_grad:
            params[TEXT_ENCODER + name] = p
    return params


class TextConds(Mapping[str, Cond]):
    """Text conditioning by the pipeline's text encoder as it is now (SD1.x/SD2.x: its last hidden state, what
    `pipe.encode_prompt` gives the UNet). Reading a prompt encodes it without gradients and keeps it until
    `clear()` (the trainer clears after every step that changes the encoder); `grad` encodes with them."""

    def __init__(self, pipe, trains: bool):
        self.tokenizer, self.encoder, self.trains = pipe.tokenizer, pipe.text_encoder, trains
        self._cache: dict[str, Cond] = {}

    def __getitem__(self, text: str) -> Cond:
        if text not in self._cache:
            with torch.no_grad():
                self._cache[text] = self.grad(text)
        return self._cache[text]

    def __iter__(self) -> Iterator[str]:
        return iter(self._cache)

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        self._cache.clear()

    def grad(self, text: str) -> Cond:
        ids, _ = slot_ids(self.tokenizer, "", 0, text)  # padded and truncated as the pipeline does
        return Cond(encode(self.encoder, ids))

    def prefixed(self, adversary: Adversary) -> Cond:
        """The conditioning of the adversarial prompt: the prefix embeddings before the prompt's words."""
        return Cond(encode(self.encoder, adversary.ids, adversary.mask, adversary.vectors))


@dataclass
class Adversary:
    """A prompt with adversarial embeddings (a prefix, or in the concept word's place): its ids with slots, the
    slots' mask, the vectors (k, D); for the inversion adversary also its own x_t, t and Eq. 5 target (else the
    example's are used)."""

    ids: Tensor
    mask: Tensor
    vectors: Tensor
    x_t: Tensor | None = None
    t: Tensor | None = None
    target: Tensor | None = None


@torch.no_grad()
def concept_images(frozen: Denoiser, scheduler, prompts: list[Cond], uncond: Cond, latent_shape: tuple[int, ...],
                   guidance: float, seed: int, batched: bool = True) -> Tensor:
    """--robust-adversary inversion: the original model's images (latents, (n, C, h, w)) of the concept, one per
    prompt, sampled once at setup by the erase's own DDIM sampler from noise drawn from `seed` (the same bank
    again on resume). The last DDIM state is at the grid's lowest timestep, close enough to clean for targets
    that are noised again."""
    generator = torch.Generator().manual_seed(seed)
    z_T = torch.randn((len(prompts), *latent_shape[1:]), generator=generator)
    z_T = z_T.to(uncond.embeds.device, uncond.embeds.dtype)
    *_, x_0 = ddim_states(frozen, scheduler, z_T, functools.reduce(Cond.cat, prompts), uncond, guidance, batched)
    return x_0


def noised(scheduler, x_0: Tensor, generator: torch.Generator,
           timesteps: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t, t, the training target at x_t) for one image of the bank, t uniform in [low, high) of `timesteps`
    (--robust-timesteps: `esd attack`'s range, or the whole schedule as textual inversion draws them)."""
    t = torch.randint(*timesteps, (1,), generator=generator)
    noise = torch.randn(x_0.shape, generator=generator).to(x_0.device, x_0.dtype)
    t = t.to(x_0.device)
    return scheduler.add_noise(x_0, noise, t), t.float(), training_target(scheduler, x_0, noise, t)


def first_prefix(tokenizer, text_encoder, n_tokens: int, generator: torch.Generator) -> Tensor:
    """The starting prefix: the embeddings of `n_tokens` random vocabulary tokens (as UnlearnDiffAtk starts)."""
    vocabulary = Vocabulary.of(tokenizer, text_encoder)
    ids = vocabulary.ids[torch.randint(len(vocabulary.ids), (n_tokens,), generator=generator)]
    weight = token_embedding(text_encoder).weight
    return weight[ids.to(weight.device)].detach().float()


def placement(mode: str, prompt: str, context: str) -> tuple[str, str]:
    """(the words before the adversarial embeddings, the words after): a prefix before the whole prompt, or in
    place of the concept's word in its phrasing ('a red {}' -> ('a red', ''))."""
    if mode == "word" and "{}" in context:
        before, after = context.split("{}", 1)
        return before.strip(), after.strip()
    return "", prompt


def attack_example(text: TextConds, trained: Denoiser, before: str, after: str, x_t: Tensor, t: Tensor,
                   concept_eps: Tensor, start: Tensor, steps: int, lr: float) -> tuple[Adversary, list[float]]:
    """The inner attack: `steps` of the prefix search from `start` so that the model being trained, prompted with
    the embeddings between `before` and `after`, predicts `concept_eps` (the frozen model's prediction for the
    concept) at x_t."""
    ids, mask = slot_ids(text.tokenizer, before, len(start), after)

    def loss_of(embeds: Tensor) -> Tensor:
        return F.mse_loss(trained(x_t, t, Cond(embeds)).float(), concept_eps.float())

    vectors, losses = search_prefix(text.encoder, ids, mask, start, loss_of, steps, lr)
    return Adversary(ids, mask, vectors), losses
