"""--robust during an erase: each example's adversarial embeddings, found by the inner attack of `esd attack`
(`esd.robust`), placed as --robust-adversary says, and the bank of concept images the inversion adversary fits to
(docs/design.md, "Adversarial erasing")."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from esd.config import adversary_modes
from esd.embeddings import slot_ids
from esd.examples import Example, Slot, guidance_start
from esd.loss import esd_target
from esd.phrasing import phrase
from esd.prepare import autocast
from esd.robust import Adversary, attack_example, concept_images, first_prefix, noised, placement
from esd.sampling import predict_prompts

if TYPE_CHECKING:
    from esd.prepare import Setup


def image_bank(s: Setup) -> list[tuple[str, str, torch.Tensor]]:
    """--robust-adversary inversion: --robust-images images of the concepts by the original model, in turn over
    the concepts and their phrasings, so the inner attack sees every way the concept is asked for."""
    cfg, contexts = s.cfg, s.cfg.contexts or ["{}"]
    pairs = [(cfg.concepts[i % len(cfg.concepts)], contexts[i % len(contexts)]) for i in range(cfg.robust_images)]
    with autocast(cfg, s.device):
        x_0 = concept_images(s.frozen, s.scheduler, [s.conds[phrase(c, w)] for w, c in pairs], s.conds[""],
                             s.latent_shape, s.guidance, cfg.seed, cfg.guidance_batch)
    return [(w, c, x[None]) for (w, c), x in zip(pairs, x_0, strict=True)]


def adversary(s: Setup, slot: Slot, example: Example, turn: int, refresh: bool) -> Adversary:
    """--robust: this example's adversarial prompt, the slot's embeddings for its placement, refreshed by the inner
    attack when due. With several --robust-adversary kinds, `turn` picks one: they alternate over the batch's
    slots and the iterations."""
    cfg = s.cfg
    modes = adversary_modes(cfg.robust_adversary)
    mode = "prefix" if cfg.erase_from else modes[turn % len(modes)]  # with --erase-from ε_θ's prompt does not name
    if mode == "inversion":                                          # the concept: no word to replace
        return inversion_adversary(s, slot, refresh)
    where = placement(mode, example.text, example.context)
    if refresh or mode not in slot.adversaries:
        refresh_adversary(s, slot, mode, where, example.x_t, example.t, example.concept_eps)
    vectors = slot.adversaries[mode]
    ids, mask = slot_ids(s.pipe.tokenizer, where[0], len(vectors), where[1])
    return Adversary(ids, mask, vectors)


def inversion_adversary(s: Setup, slot: Slot, refresh: bool) -> Adversary:
    """--robust-adversary inversion: an image of the bank noised at a random timestep, the slot's embedding in the
    concept word's place of the image's phrasing (fitted, when due, to denoise it: the textual-inversion loss), and
    Eq. 5's target there from the frozen model."""
    w, context, x_0 = s.bank[int(torch.randint(len(s.bank), (1,), generator=slot.gen))]
    x_t, t, truth = noised(s.scheduler, x_0, slot.gen, (0, s.scheduler.config.num_train_timesteps))  # any t, as TI
    where = placement("word", phrase(context, w), context)
    if refresh or "inversion" not in slot.adversaries:
        refresh_adversary(s, slot, "inversion", where, x_t, t, truth)
    vectors = slot.adversaries["inversion"]
    ids, mask = slot_ids(s.pipe.tokenizer, where[0], len(vectors), where[1])
    with torch.no_grad():
        start, concept = predict_prompts(s.frozen, x_t, t, [s.conds[guidance_start(s.cfg, context)],
                                                            s.conds[phrase(context, w)]], s.cfg.guidance_batch)
    return Adversary(ids, mask, vectors, x_t, t, esd_target(start, concept, s.cfg.eta))


def refresh_adversary(s: Setup, slot: Slot, mode: str, where: tuple[str, str], x_t: torch.Tensor, t: torch.Tensor,
                      goal: torch.Tensor) -> None:
    """--robust: a few steps of the inner attack at (x_t, t) towards `goal`, warm-started from the slot's last
    embeddings of this placement (between refreshes they are used as they are): --robust-tokens for a prefix, one
    for a word."""
    cfg = s.cfg
    if mode not in slot.adversaries:
        n = cfg.robust_tokens if mode == "prefix" else 1
        slot.adversaries[mode] = first_prefix(s.pipe.tokenizer, s.pipe.text_encoder, n, slot.gen)
    found, _ = attack_example(s.text, s.trained, *where, x_t, t, goal, slot.adversaries[mode], cfg.robust_steps,
                              cfg.robust_lr)
    slot.adversaries[mode] = found.vectors
