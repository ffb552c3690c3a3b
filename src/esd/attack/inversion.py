"""The textual-inversion attack: one new word, learned on the erased model, that draws the erased concept.

Pham et al. 2024, "Circumventing Concept Erasure Methods For Text-to-Image Generative Models": erasure methods
cut the link between a concept's *words* and its images, not the model's ability to draw it. Textual inversion
(Gal et al. 2023) on the erased model, with images of the concept made by the original model, finds a new token
embedding v* whose prompts bring the concept back:

    min_v  E_{x_0, t, ε} || ε_θ(x_t, t, c(p, v)) − ε ||²,

where c(p, v) encodes a training prompt p with v in the concept's place (the prompt that made x_0, the concept
word replaced by the new token, or ", <token>" appended when the prompt does not name it). Only v learns; the
erased UNet and the text encoder stay frozen. The learned token is then added to the tokenizer and judged as
text: "a red <token>" in the place of "a red circle", and "<token>", "a <token>".
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from esd.embeddings import (
    FixedDraws,
    denoising_loss,
    draw_noise,
    encode,
    frozen,
    slot_ids,
    token_embedding,
    word_ids,
)
from esd.errors import EsdError


@dataclass(frozen=True)
class Template:
    """A prompt with a hole where the concept was: `before` + word + `after`."""

    before: str
    after: str

    def render(self, word: str) -> str:
        return f"{self.before}{word}{self.after}"


def template_of(prompt: str, concept: str) -> Template:
    """The prompt with its first whole-word mention of the concept (any case) as the hole; a prompt that does
    not name it gets the hole appended after a comma."""
    match = re.search(rf"(?<!\w){re.escape(concept)}(?!\w)", prompt, flags=re.IGNORECASE)
    if match is None:
        return Template(f"{prompt}, " if prompt else "", "")
    return Template(prompt[: match.start()], prompt[match.end() :])


def without_concept(prompt: str, concept: str) -> str | None:
    """The prompt with the concept's word taken out ("a red circle, striped" -> "a red, striped"), the baseline
    an attack must beat: a prompt that only drowns the word out gets the model's default back; None when the
    prompt does not name the concept. Every mention goes."""
    text, n = re.subn(rf"(?<!\w){re.escape(concept)}(?!\w)", "", prompt, flags=re.IGNORECASE)
    if n == 0:
        return None
    return re.sub(r"\s+,", ",", re.sub(r"\s+", " ", text)).strip(" ,")


GENERIC = (Template("", ""), Template("a ", ""))  # "<token>" and "a <token>", judged besides the prompts


def slug(concept: str) -> str:
    """The concept as a file-name-safe word: "Van Gogh" -> "van-gogh"."""
    return re.sub(r"[^a-z0-9]+", "-", concept.lower()).strip("-") or "concept"


def placeholder_token(concept: str) -> str:
    """The new token's text, e.g. "<esd-circle>" (one added token; CLIP lowercases prompts)."""
    return f"<esd-{slug(concept)}>"


@dataclass
class InversionResult:
    """The learned embedding and what learning it cost."""

    vector: Tensor  # (D,)
    init_word: str
    losses: list[float] = field(default_factory=list)
    loss_start: float | None = None  # on fixed timesteps and noise, with the initial embedding
    loss_end: float | None = None
    loss_concept: float | None = None  # the same, with the concept's own word in the hole
    seconds: float = 0.0


def init_vector(pipe, word: str) -> Tensor:
    """The embedding of `word`'s first token: textual inversion starts from a coarse description."""
    ids = word_ids(pipe.tokenizer, word)
    if not ids:
        raise EsdError(f"--init-word {word!r}: no tokens")
    return token_embedding(pipe.text_encoder).weight[ids[0]].detach().clone().float()


def learn_token(pipe, examples: list[tuple[Template, Tensor]], concept: str, steps: int = 200, lr: float = 5e-3,
                seed: int = 0, init_word: str = "a", batch_size: int = 4, timesteps: tuple[int, int] | None = None,
                progress: bool = False) -> InversionResult:
    """Learn one token embedding on the pipeline's (erased) UNet from `examples`: (template, latents (n, C, h, w))
    pairs, the original model's images of the concept with the prompt that made them.

    Adam on the vector alone; each step draws `batch_size` images (with their templates), a timestep in
    `timesteps` (default: the whole schedule) and noise for each, all from `seed`.
    """
    start = time.perf_counter()
    tokenizer, text_encoder, unet, scheduler = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.scheduler
    T = timesteps or (0, int(scheduler.config.num_train_timesteps))
    latents = torch.cat([lat for _, lat in examples])
    slots = [slot_ids(tokenizer, tpl.before, 1, tpl.after) for tpl, lat in examples for _ in range(len(lat))]
    ids, masks = torch.cat([i for i, _ in slots]), torch.cat([m for _, m in slots])
    concept_ids = torch.cat([slot_ids(tokenizer, tpl.render(concept), 0)[0] for tpl, lat in examples
                             for _ in range(len(lat))])
    vector = init_vector(pipe, init_word).requires_grad_(True)
    optimiser = torch.optim.Adam([vector], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    draws = FixedDraws.of(latents, seed + 1, T, repeats=2)
    rep = len(draws.latents) // len(latents)
    result = InversionResult(vector, init_word)

    def learned_embeds() -> Tensor:  # every example's prompt with the vector in the hole
        return encode(text_encoder, ids, masks, vector[None])

    with frozen(text_encoder, unet):
        with torch.no_grad():
            result.loss_start = draws.loss(unet, scheduler, learned_embeds().repeat(rep, 1, 1))
            result.loss_concept = draws.loss(unet, scheduler, encode(text_encoder, concept_ids).repeat(rep, 1, 1))
        for _ in tqdm(range(steps), desc="textual inversion", disable=not progress, leave=False):
            pick = torch.randint(len(latents), (min(batch_size, len(latents)),), generator=generator)
            batch = latents[pick.to(latents.device)]
            t, noise = draw_noise(batch, generator, T)
            embeds = encode(text_encoder, ids[pick], masks[pick], vector[None])
            loss = denoising_loss(unet, scheduler, batch, embeds, t, noise)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            result.losses.append(float(loss.detach()))
        with torch.no_grad():
            result.loss_end = draws.loss(unet, scheduler, learned_embeds().repeat(rep, 1, 1))
    result.vector = vector.detach().cpu()
    result.seconds = time.perf_counter() - start
    return result


def add_token(pipe, token: str, vector: Tensor) -> int:
    """Add `token` to the pipeline's tokenizer with `vector` as its embedding (the text encoder's table grows by
    one row); prompts naming it then work through the ordinary pipeline. Returns its id."""
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token])
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    token_id = tokenizer.convert_tokens_to_ids(token)
    weight = token_embedding(text_encoder).weight
    with torch.no_grad():
        weight[token_id] = vector.to(weight.device, weight.dtype)
    return int(token_id)
