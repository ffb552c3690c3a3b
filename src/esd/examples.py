"""The examples of Algorithm 1, and the loss over a batch of them, in the paper's steps:

    draw          w ~ W (in a phrasing, --contexts), a prompt to keep (--retain/--siblings), k ~ U[0, N), z_T
    sample_x_t    x_t = DDIM(ε_θ, s, w) from z_T till step k, every example of the iteration in one batched run
    build_examples t in step k's band, the Eq. 5 target from ε*, and ε* of the kept prompt at its own x_t,
                  the whole batch's frozen predictions in one forward
    batch_loss    ‖ε_θ(x_t, w, t) − target‖² (+ --retain-weight × the kept prompts' term)

`draw_examples` runs the first three for every slot; each `Slot` is one stream of examples with its own random
generators, so an example's numbers do not depend on the others' (docs/design.md, "The method").
"""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from esd.config import EraseConfig
from esd.loss import esd_loss, esd_target
from esd.phrasing import anchor, phrase, retain_pool
from esd.robust import Adversary, TextConds
from esd.sampling import (
    Cond,
    Denoiser,
    predict_rows,
    sample_trajectory,
    sample_until_each,
    step_timestep,
)


@dataclass
class Example:
    """One training example of Algorithm 1: the sampled x_t, its timestep t and the Eq. 5 target."""

    concept: str
    k: int  # DDIM step the sampler stopped at
    x_t: torch.Tensor  # (1, 4, h, w)
    t: torch.Tensor  # (1,)
    prompt: Cond  # what ε_θ is conditioned on: the concept (in its phrasing), or the erase-from context
    target: torch.Tensor  # (1, 4, h, w)
    # With --retain/--siblings: (r, x_t^r, ε*(x_t^r, r, t)), a prompt to keep, its own x_t and the frozen model's
    # prediction for it.
    retain: tuple[Cond, torch.Tensor, torch.Tensor] | None = None
    text: str = ""  # the text of `prompt` (re-encoded with gradients when the text encoder is trained)
    context: str = "{}"  # the phrasing of the concept ('a red {}'), where a --robust word adversary goes
    retain_text: str | None = None  # the text of the kept prompt
    concept_eps: torch.Tensor | None = None  # ε*(x_t, w, t): what the --robust inner attack steers ε_θ towards
    adversary: Adversary | None = None  # --robust: the adversarial prefix found for this example


@dataclass
class Slot:
    """One stream of examples: its own random draws and, with --trajectory-reuse, its cached trajectory."""

    rng: random.Random  # concept draws
    gen: torch.Generator  # k, t and noise: a CPU generator, so a seed means the same on every device
    concept: str = ""
    context: str = "{}"  # the phrasing the cached trajectory was sampled with
    kept: str | None = None  # and the retained prompt sampled beside it
    trajectory: list[torch.Tensor] = field(default_factory=list)
    uses_left: int = 0
    # --robust: this stream's adversarial embeddings by placement ("prefix", "word"), each warm-started from its last
    adversaries: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def seeded(cls, seed: int) -> Slot:
        return cls(random.Random(seed), torch.Generator().manual_seed(seed))

    def state_dict(self) -> dict:
        """Everything the slot's next draws depend on (for checkpoints: plain data and CPU tensors)."""
        return {"rng": self.rng.getstate(), "gen": self.gen.get_state(), "concept": self.concept,
                "context": self.context, "kept": self.kept,
                "trajectory": [x.cpu() for x in self.trajectory],
                "uses_left": self.uses_left, "adversaries": {k: v.cpu() for k, v in self.adversaries.items()}}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.rng.setstate(state["rng"])
        self.gen.set_state(state["gen"])
        self.concept, self.context, self.kept = state["concept"], state["context"], state["kept"]
        self.trajectory = [x.to(device) for x in state["trajectory"]]
        self.uses_left = state["uses_left"]
        self.adversaries = {k: v.to(device) for k, v in state.get("adversaries", {}).items()}


@dataclass
class Draw:
    """Algorithm 1's draws for one example, before x_t is sampled: w in its phrasing, the prompt kept beside it,
    the DDIM step k and the noise z_T (a second row for the kept prompt's own trajectory)."""

    concept: str  # w
    context: str  # its phrasing, '{}' standing for w
    kept: str | None  # with --retain/--siblings: the prompt held to ε* this iteration
    k: int
    z_T: torch.Tensor | None  # (1 or 2, 4, h, w); None when x_t comes from the slot's cached trajectory

    @property
    def text(self) -> str:
        return phrase(self.context, self.concept)


def draw(cfg: EraseConfig, slot: Slot, latent_shape: tuple[int, ...], device, dtype) -> Draw:
    """Steps 1–3: w ~ W (in a phrasing, with --contexts), a prompt to keep, k ~ U[0, N) and z_T ~ N(0, I)."""
    reuse = cfg.trajectory_reuse > 1 and slot.uses_left > 0
    w = slot.concept if reuse else slot.rng.choice(cfg.concepts)
    context = slot.context if reuse else (slot.rng.choice(cfg.contexts) if cfg.contexts else "{}")
    pool = retain_pool(cfg.retain or [], cfg.concepts)
    holds = bool(pool or retain_pool(cfg.siblings or [], cfg.concepts))
    kept = (slot.kept if reuse else kept_prompt(cfg, pool, context, slot)) if holds else None
    k = int(torch.randint(cfg.ddim_steps, (1,), generator=slot.gen))
    if reuse:
        return Draw(concept=w, context=context, kept=kept, k=k, z_T=None)
    rows = 2 if holds else 1  # the kept prompt's x_t is sampled beside the concept's, from its own noise
    z_T = torch.cat([torch.randn(latent_shape, generator=slot.gen) for _ in range(rows)]).to(device, dtype)
    return Draw(concept=w, context=context, kept=kept, k=k, z_T=z_T)


@torch.no_grad()
def sample_x_t(cfg: EraseConfig, draws: list[Draw], slots: list[Slot], sampler: Denoiser, scheduler,
               sample_conds: Mapping[str, Cond], guidance: float) -> list[torch.Tensor]:
    """Step 4: x_t of every draw, DDIM (or Euler) with CFG from z_T till step k, by the sampler (ε_θ, the paper;
    ε* with --sample-from frozen). The draws of one iteration run together, one batched forward per step, each
    leaving the batch at its own k (`sample_until_each`). With --trajectory-reuse a slot samples one full
    trajectory and reads x_t from it for that many iterations."""
    def cond(d: Draw) -> Cond:
        prompt = sample_conds[cfg.erase_from or d.text]
        return Cond.cat(prompt, sample_conds[d.kept]) if d.kept is not None else prompt

    xs: list[torch.Tensor | None] = [None] * len(draws)
    fresh = [i for i, d in enumerate(draws) if d.z_T is not None and cfg.trajectory_reuse == 1]
    for group in [fresh] if cfg.sampler_batch else [[i] for i in fresh]:  # --no-sampler-batch: one at a time
        if not group:
            continue
        z_T = torch.cat([draws[i].z_T for i in group])
        ks = [draws[i].k for i in group for _ in range(len(draws[i].z_T))]
        batch = functools.reduce(Cond.cat, [cond(draws[i]) for i in group])
        x = sample_until_each(sampler, scheduler, z_T, batch, sample_conds[""], guidance, ks, cfg.guidance_batch)
        for i, part in zip(group, x.split([len(draws[i].z_T) for i in group]), strict=True):
            xs[i] = part
    for i, (d, slot) in enumerate(zip(draws, slots, strict=True)):
        if d.z_T is not None and cfg.trajectory_reuse > 1:  # one full run now, read by the next R iterations
            slot.trajectory = sample_trajectory(sampler, scheduler, d.z_T, cond(d), sample_conds[""], guidance,
                                                cfg.guidance_batch)
            slot.concept, slot.context, slot.kept = d.concept, d.context, d.kept
            slot.uses_left = cfg.trajectory_reuse
        if xs[i] is None:
            xs[i] = slot.trajectory[d.k]
        slot.uses_left -= 1
    return xs


def target_rows(cfg: EraseConfig, conds: Mapping[str, Cond], scheduler, d: Draw, x: torch.Tensor,
                slot: Slot) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, Cond]]]:
    """Step 5 and the inputs of step 6 for one draw: t in step k's band (or the grid's, --timestep grid), and the
    (x, prompt) pairs ε* is evaluated at — x_t with the guidance start, the concept (and the erase-from context),
    and with a kept prompt its own x_t with it."""
    x_t, x_kept = x[:1], x[1:]
    t = torch.tensor([step_timestep(d.k, scheduler, slot.gen, cfg.timestep)], device=x.device)
    rows = {"start": (x_t, conds[guidance_start(cfg, d.context)]), "concept": (x_t, conds[d.text])}
    if cfg.erase_from:
        rows["context"] = (x_t, conds[cfg.erase_from])
    if d.kept is not None:
        rows["retain"] = (x_kept, conds[d.kept])
    return t, rows


@torch.no_grad()
def build_examples(cfg: EraseConfig, conds: Mapping[str, Cond], frozen: Denoiser, scheduler, draws: list[Draw],
                   xs: list[torch.Tensor], slots: list[Slot]) -> list[Example]:
    """Steps 5–6 for every draw of the iteration: t, and the frozen model's Eq. 5 target at x_t (with a kept
    prompt, also ε* of the kept prompt at its own x_t). All of the batch's frozen predictions go through one
    forward (one per prediction with --no-guidance-batch): on a GPU a forward costs about the same whatever its
    batch, and on a CPU a small batch costs more per image than a large one."""
    inputs = [target_rows(cfg, conds, scheduler, d, x, slot) for d, x, slot in zip(draws, xs, slots, strict=True)]
    rows = [(x, t, c) for t, named in inputs for x, c in named.values()]
    flat = iter(predict_rows(frozen, rows, cfg.guidance_batch))
    examples = []
    for d, (t, named) in zip(draws, inputs, strict=True):
        eps = {name: next(flat) for name in named}
        target = esd_target(eps["start"], eps["concept"], cfg.eta, eps.get("context"))
        x_t = named["concept"][0]
        retain = None
        if d.kept is not None:  # (r, x_t^r, ε*(x_t^r, r, t))
            x_kept, kept = named["retain"]
            retain = (kept, x_kept, eps["retain"])
        prompt_text = cfg.erase_from or d.text
        examples.append(Example(concept=d.concept, k=d.k, x_t=x_t, t=t, prompt=conds[prompt_text],
                                target=target, retain=retain, text=prompt_text, context=d.context,
                                retain_text=d.kept, concept_eps=eps["concept"]))
    return examples


def draw_examples(cfg: EraseConfig, conds: Mapping[str, Cond], sampler: Denoiser, frozen: Denoiser, scheduler,
                  latent_shape: tuple[int, ...], slots: list[Slot], guidance: float | None = None,
                  sample_conds: Mapping[str, Cond] | None = None) -> list[Example]:
    """One example per slot, Algorithm 1's steps in order: draw (w, k, z_T), sample x_t, build t and the target.

    `guidance`: the sampler's classifier-free guidance scale (default --start-guidance; 1 for a guidance-distilled
    model, whose guidance is an input of the network instead). `conds` is the frozen model's conditioning;
    `sample_conds` the sampler's (default the same; the trained encoder's with --train-text-encoder)."""
    guidance = cfg.start_guidance if guidance is None else guidance
    sample_conds = conds if sample_conds is None else sample_conds
    null = conds[""].embeds
    draws = [draw(cfg, slot, latent_shape, null.device, null.dtype) for slot in slots]
    xs = sample_x_t(cfg, draws, slots, sampler, scheduler, sample_conds, guidance)
    return build_examples(cfg, conds, frozen, scheduler, draws, xs, slots)


def draw_example(cfg: EraseConfig, conds: Mapping[str, Cond], sampler: Denoiser, frozen: Denoiser, scheduler,
                 latent_shape: tuple[int, ...], slot: Slot, guidance: float | None = None,
                 sample_conds: Mapping[str, Cond] | None = None) -> Example:
    """One example of one slot (`draw_examples` with a single slot)."""
    return draw_examples(cfg, conds, sampler, frozen, scheduler, latent_shape, [slot], guidance, sample_conds)[0]


def guidance_start(cfg: EraseConfig, context: str) -> str:
    """Where Eq. 5's guidance starts for a phrasing: "" (the paper), the phrasing without the concept ("a red" for
    "a red {}", --contexts), or with --start-from-sibling the phrasing with a sibling ("a red square").

    One sibling per phrasing, fixed (they take turns over --contexts): a sibling drawn per example would train
    the mean of the siblings' predictions at the same x_t, a blend of two shapes.
    """
    if not cfg.start_from_sibling:
        return anchor(context)
    siblings = retain_pool(cfg.siblings or [], cfg.concepts)
    contexts = cfg.contexts or ["{}"]
    return phrase(context, siblings[contexts.index(context) % len(siblings)])


def kept_prompt(cfg: EraseConfig, pool: list[str], context: str, slot: Slot) -> str:
    """The prompt held to ε* this iteration: a --retain prompt, or with --siblings, half the time the iteration's
    own phrasing with a sibling concept in place of the erased one ("red square" while erasing "red circle").

    The siblings are what an edit of the concept's phrasings is likeliest to move: they share every other word,
    and in a text encoder where concept words are nearly collinear, most of the concept word too.
    """
    siblings = retain_pool(cfg.siblings or [], cfg.concepts)
    if siblings and (not pool or slot.rng.random() < 0.5):
        return phrase(context, slot.rng.choice(siblings))
    return slot.rng.choice(pool)


def batch_loss(cfg: EraseConfig, trained: Denoiser, batch: list[Example], text: TextConds | None = None) -> torch.Tensor:
    """The Eq. 5 loss over the batch (and, with --robust, over its adversarial prompts: at the example's x_t, t and
    target, or the inversion adversary's own), plus --retain-weight × the retain term, from one forward of ε_θ. `text`: the encoder being trained
    (--train-text-encoder: every prompt is re-encoded with gradients) or used for the prefixed prompts."""
    def own(cond: Cond, words: str | None) -> Cond:
        return text.grad(words) if text is not None and text.trains else cond

    rows = [(ex.x_t, ex.t, ex.target) for ex in batch]  # the erase term's (x_t, t, target)
    conds = [own(ex.prompt, ex.text) for ex in batch]
    for ex in batch:
        if (adv := ex.adversary) is not None:  # the example's x_t, t and target, or the adversary's (inversion)
            rows.append((ex.x_t, ex.t, ex.target) if adv.x_t is None else (adv.x_t, adv.t, adv.target))
            conds.append(text.prefixed(adv))
    held = [ex for ex in batch if ex.retain is not None]
    conds += [own(ex.retain[0], ex.retain_text) for ex in held]
    x_t = torch.cat([x for x, _, _ in rows] + [ex.retain[1] for ex in held])
    t = torch.cat([t for _, t, _ in rows] + [ex.t for ex in held])
    out = trained(x_t, t, functools.reduce(Cond.cat, conds))
    n = len(rows)
    loss = esd_loss(out[:n], torch.cat([target for _, _, target in rows]))
    if held:  # ‖ε_θ(x_t^r, r, t) − ε*(x_t^r, r, t)‖²: what the erase must not move
        loss = loss + cfg.retain_weight * esd_loss(out[n:], torch.cat([ex.retain[2] for ex in held]))
    return loss


def held_prompts(cfg: EraseConfig) -> list[str]:
    """The prompts `kept_prompt` holds to their own frozen prediction: the --retain prompts that do not name an
    erased concept, and each phrasing with each --siblings word."""
    held = set(retain_pool(cfg.retain or [], cfg.concepts))
    for context in cfg.contexts or ["{}"]:
        held |= {phrase(context, s) for s in retain_pool(cfg.siblings or [], cfg.concepts)}
    return sorted(held)


def prompts_needed(cfg: EraseConfig) -> set[str]:
    """Every prompt `draw_example` may condition on: "", the concepts, the erase-from context, each phrasing of
    each concept and its anchor, each phrasing of each sibling, and the retained prompts. The text encoder is frozen: each is encoded once."""
    prompts = {"", *cfg.concepts, *([cfg.erase_from] if cfg.erase_from else [])}
    for context in cfg.contexts or []:
        prompts |= {anchor(context), *(phrase(context, c) for c in cfg.concepts)}
    return prompts | set(held_prompts(cfg))
