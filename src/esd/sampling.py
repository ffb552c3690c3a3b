"""Partial DDIM sampling with classifier-free guidance: the x_t of ESD's Algorithm 1.

A denoiser here is any callable `eps(x, t, cond) -> Tensor` giving the model's native output
(ε, or v for v-prediction models); the scheduler turns it into DDIM updates. Nothing in diffusers
is patched: we call the UNet and `scheduler.step` ourselves and stop early.

Step indexing (docs/design.md, "DDIM step indexing"): with N DDIM steps over T training timesteps,
step k ∈ [0, N) is the band of timesteps [round(k/N·T), round((k+1)/N·T)). The DDIM grid has exactly
one timestep τ_k in each band; "sampling till step k" runs the N−1−k updates from pure noise (at
τ_{N−1}) down to τ_k. A larger k therefore means fewer denoising steps, a noisier x and a larger t,
as in the 2023 code.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler
from torch import Tensor


@dataclass
class Cond:
    """Text conditioning of one prompt: what the UNet takes besides x and t."""

    embeds: Tensor  # (1, 77, D) text encoder hidden states
    added: dict[str, Tensor] = field(default_factory=dict)  # SDXL: text_embeds (1, 1280), time_ids (1, 6)

    def repeat(self, n: int) -> Cond:
        return Cond(self.embeds.expand(n, *self.embeds.shape[1:]),
                    {k: v.expand(n, *v.shape[1:]) for k, v in self.added.items()})

    def to(self, device: torch.device | str) -> Cond:
        return Cond(self.embeds.to(device), {k: v.to(device) for k, v in self.added.items()})

    @staticmethod
    def cat(a: Cond, b: Cond) -> Cond:
        return Cond(torch.cat([a.embeds, b.embeds]), {k: torch.cat([a.added[k], b.added[k]]) for k in a.added})


Denoiser = Callable[[Tensor, Tensor, Cond], Tensor]


def unet_denoiser(unet: torch.nn.Module) -> Denoiser:
    """Wrap a diffusers UNet2DConditionModel into the denoiser signature."""

    def eps(x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        kwargs = {"added_cond_kwargs": cond.added} if cond.added else {}
        return unet(x, t, encoder_hidden_states=cond.embeds.to(x.dtype), **kwargs).sample

    return eps


def predict_prompts(eps: Denoiser, x: Tensor, t: Tensor, conds: list[Cond], batched: bool = True) -> list[Tensor]:
    """ε(x, c, t) for each prompt c at the same x and t: one forward over all prompts unless `batched` is False.

    ESD needs ε*(x_t, t) and ε*(x_t, c, t) (and ε*(x_t, f, t) in erase-from mode) at one x_t; batching
    them turns two or three forwards into one, which is what a GPU is fastest at.
    """
    return predict_pairs(eps, [x] * len(conds), t, conds, batched)


def predict_pairs(eps: Denoiser, xs: list[Tensor], t: Tensor, conds: list[Cond], batched: bool = True) -> list[Tensor]:
    """ε(x_i, c_i, t) for each pair, all x_i of one batch size: one forward unless `batched` is False."""
    if not batched:
        return [eps(x, t, c.repeat(len(x))) for x, c in zip(xs, conds, strict=True)]
    n = len(xs[0])
    t = t.expand(n) if t.numel() == 1 else t
    out = eps(torch.cat(xs), t.repeat(len(conds)), functools.reduce(Cond.cat, [c.repeat(n) for c in conds]))
    return list(out.chunk(len(conds)))


def guided(eps: Denoiser, x: Tensor, t: Tensor, cond: Cond, uncond: Cond, scale: float, batched: bool = True):
    """Classifier-free guidance: ε(x,∅) + s·(ε(x,c) − ε(x,∅)); one batched forward unless `batched` is False
    (the original cost model: two separate forwards)."""
    e_uncond, e_cond = predict_prompts(eps, x, t, [uncond, cond], batched)
    return e_uncond + scale * (e_cond - e_uncond)


def ddim_scheduler(config, num_steps: int) -> DDIMScheduler:
    """A private deterministic DDIM scheduler (η_DDIM = 0) with `num_steps` steps."""
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(num_steps)
    return scheduler


def ddim_states(eps: Denoiser, scheduler: DDIMScheduler, z_T: Tensor, cond: Cond, uncond: Cond,
                guidance: float, batched: bool = True) -> Iterator[Tensor]:
    """Yield the DDIM states of a CFG run from pure noise z_T: first z_T (step N−1's level), then each update."""
    x = z_T * scheduler.init_noise_sigma
    yield x
    for t in scheduler.timesteps[:-1]:  # descending: τ_{N−1}, ..., τ_1; the last update lands on τ_0
        out = guided(eps, scheduler.scale_model_input(x, t), t.expand(len(x)).to(x.device), cond, uncond,
                     guidance, batched)
        x = scheduler.step(out, t, x).prev_sample
        yield x


@torch.no_grad()
def sample_until(eps: Denoiser, scheduler: DDIMScheduler, z_T: Tensor, cond: Cond, uncond: Cond,
                 guidance: float, k: int, batched: bool = True) -> Tensor:
    """Run DDIM with CFG from pure noise z_T and return the latent at the noise level of step k.

    That is the state after N−1−k updates of a full N-step run (k = N−1 returns z_T itself); the run
    stops there, so a noisier step costs fewer UNet calls.
    """
    n = len(scheduler.timesteps)
    if not 0 <= k < n:
        raise ValueError(f"DDIM step k={k} outside [0, {n})")
    states = ddim_states(eps, scheduler, z_T, cond, uncond, guidance, batched)
    return next(itertools.islice(states, n - 1 - k, None))


def band_timestep(k: int, num_steps: int, num_train_timesteps: int, generator: torch.Generator) -> int:
    """A training timestep drawn uniformly from step k's band [round(k/N·T), round((k+1)/N·T))."""
    low = round(k / num_steps * num_train_timesteps)
    high = max(low + 1, round((k + 1) / num_steps * num_train_timesteps))
    return int(torch.randint(low, high, (1,), generator=generator))


@torch.no_grad()
def sample_trajectory(eps: Denoiser, scheduler: DDIMScheduler, z_T: Tensor, cond: Cond, uncond: Cond,
                      guidance: float, batched: bool = True) -> list[Tensor]:
    """All DDIM states of one full run: element k is the latent at step k's noise level (= sample_until(k)).

    The opt-in `--trajectory-reuse R` draws x_t for R iterations from one such run: N−1 updates per R
    iterations instead of (N−1)/2 on average per iteration.
    """
    return list(ddim_states(eps, scheduler, z_T, cond, uncond, guidance, batched))[::-1]  # k: N−1−k updates
