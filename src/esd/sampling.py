"""Partial DDIM sampling with classifier-free guidance: the x_t of ESD's Algorithm 1.

A denoiser here is any callable `eps(x, t, cond) -> Tensor` giving the model's native output
(ε, or v for v-prediction models, the velocity for flow-matching ones); the scheduler turns it into
DDIM updates, or Euler updates of the flow for SD3/FLUX. Nothing in diffusers is patched: we call the
network and `scheduler.step` (or the Euler step) ourselves and stop early.

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

import torch
from diffusers import DDIMScheduler
from torch import Tensor

from esd.networks import Cond, forward

Denoiser = Callable[[Tensor, Tensor, Cond], Tensor]


def unet_denoiser(net: torch.nn.Module) -> Denoiser:
    """Wrap a pipeline's denoising network (a UNet, or an SD3/FLUX transformer) into the denoiser signature."""
    def eps(x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return forward(net, x, t, cond)

    return eps


def predict_prompts(eps: Denoiser, x: Tensor, t: Tensor, conds: list[Cond], batched: bool = True) -> list[Tensor]:
    """ε(x, c, t) for each prompt c at the same x and t: one forward over all prompts unless `batched` is False.

    ESD needs ε*(x_t, t) and ε*(x_t, c, t) (and ε*(x_t, f, t) in erase-from mode) at one x_t; batching
    them turns two or three forwards into one, which is what a GPU is fastest at.
    """
    return predict_rows(eps, [(x, t, c) for c in conds], batched)


def predict_rows(eps: Denoiser, rows: list[tuple[Tensor, Tensor, Cond]], batched: bool = True) -> list[Tensor]:
    """ε(x, c, t) for each (x, t, c), each x with its own t and prompt: one forward over all of them unless
    `batched` is False (then one forward per row)."""
    if not batched:
        return [eps(x, t, c.repeat(len(x))) for x, t, c in rows]
    sizes = [len(x) for x, _, _ in rows]
    x = torch.cat([x for x, _, _ in rows])
    t = torch.cat([t.expand(n) for (_, t, _), n in zip(rows, sizes, strict=True)])
    cond = functools.reduce(Cond.cat, [c.repeat(n) for (_, _, c), n in zip(rows, sizes, strict=True)])
    return list(eps(x, t, cond).split(sizes))


def guided(eps: Denoiser, x: Tensor, t: Tensor, cond: Cond, uncond: Cond, scale: float, batched: bool = True):
    """Classifier-free guidance: ε(x,∅) + s·(ε(x,c) − ε(x,∅)); one batched forward unless `batched` is False
    (the original cost model: two separate forwards). s = 1 is the conditional prediction alone: one forward
    (how guidance-distilled FLUX samples, its guidance scale being an input of the network)."""
    if scale == 1:
        return eps(x, t, cond.repeat(len(x)))
    e_uncond, e_cond = predict_prompts(eps, x, t, [uncond, cond], batched)
    return e_uncond + scale * (e_cond - e_uncond)


def ddim_scheduler(config, num_steps: int, image_seq_len: int | None = None,
                   empirical_mu: bool = False):  # config: or the scheduler
    """A private deterministic DDIM scheduler (η_DDIM = 0) with `num_steps` steps; for a flow-matching model
    (SD3, FLUX) its own Euler scheduler's grid of `num_steps` sigmas, with the shift the pipeline uses
    (FLUX shifts by image size: `image_seq_len`, the number of 2x2 latent patches; FLUX.2's pipelines by image
    size and number of steps, `empirical_mu`)."""
    flow = is_flow(config)
    config = getattr(config, "config", config)  # a scheduler may be given instead of its config
    if flow:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        mu = None
        if scheduler.config.get("use_dynamic_shifting", False) and empirical_mu:
            from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

            mu = compute_empirical_mu(image_seq_len or 256, num_steps)
        elif scheduler.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            mu = calculate_shift(image_seq_len or 256, scheduler.config.get("base_image_seq_len", 256),
                                 scheduler.config.get("max_image_seq_len", 4096),
                                 scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.15))
        # FluxPipeline's grid: N sigmas from 1 down to 1/N before the shift (SD3's pipeline: the scheduler's own).
        sigmas = [1.0 - i / num_steps for i in range(num_steps)] if mu is not None else None
        scheduler.set_timesteps(num_steps, sigmas=sigmas, mu=mu)
        return scheduler
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(num_steps)
    return scheduler


def is_flow(scheduler) -> bool:
    """Whether a scheduler (or its config) is flow matching: x_σ = (1 − σ)·x_0 + σ·ε, the network predicting
    ε − x_0. A config read from a folder names its class; one made in-process does not, but only flow-matching
    schedulers have `use_dynamic_shifting`."""
    if hasattr(scheduler, "config"):
        return type(scheduler).__name__.startswith("FlowMatch")
    return "FlowMatch" in str(scheduler.get("_class_name", "")) or "use_dynamic_shifting" in scheduler


def ddim_states(eps: Denoiser, scheduler, z_T: Tensor, cond: Cond, uncond: Cond,
                guidance: float, batched: bool = True) -> Iterator[Tensor]:
    """Yield the DDIM states of a CFG run from pure noise z_T: first z_T (step N−1's level), then each update.
    With a flow-matching scheduler: the Euler states x ← x + (σ_next − σ)·v on its sigma grid."""
    if is_flow(scheduler):
        yield from _flow_states(eps, scheduler, z_T, cond, uncond, guidance, batched)
        return
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


@torch.no_grad()
def sample_until_each(eps: Denoiser, scheduler, z_T: Tensor, cond: Cond, uncond: Cond, guidance: float,
                      ks: list[int], batched: bool = True) -> Tensor:
    """`sample_until` for a batch whose rows stop at their own steps: row i of z_T (conditioned on row i of `cond`)
    is returned at the noise level of step `ks[i]`.

    Every row starts from pure noise on the same grid, so after j updates all rows still running sit at the same
    timestep: one batched forward per step serves them all, and a row leaves the batch once it has had its
    N−1−k updates. The sequential steps of an iteration go from Σ(N−1−k) to max(N−1−k); each row gets exactly the
    updates `sample_until` would give it (equal up to the rounding of a larger batch)."""
    n = len(scheduler.timesteps)
    if any(not 0 <= k < n for k in ks):
        raise ValueError(f"DDIM steps {ks} outside [0, {n})")
    todo = [n - 1 - k for k in ks]
    flow = is_flow(scheduler)
    sigmas = scheduler.sigmas.tolist() if flow else None
    x = z_T.clone() if flow else z_T * scheduler.init_noise_sigma
    for j, t in enumerate(scheduler.timesteps[:-1]):
        rows = [i for i, left in enumerate(todo) if left > j]
        if not rows:
            break
        index = torch.tensor(rows, device=x.device)
        part, c = x[index], cond.rows(index)
        if flow:  # Euler on the sigma grid, as `_flow_states`
            out = guided(eps, part, t.expand(len(part)).to(x.device), c, uncond, guidance, batched)
            x[index] = part + (sigmas[j + 1] - sigmas[j]) * out
        else:
            out = guided(eps, scheduler.scale_model_input(part, t), t.expand(len(part)).to(x.device), c, uncond,
                         guidance, batched)
            x[index] = scheduler.step(out, t, part).prev_sample
    return x


def _flow_states(eps: Denoiser, scheduler, z_T: Tensor, cond: Cond, uncond: Cond, guidance: float,
                 batched: bool) -> Iterator[Tensor]:
    """The flow-matching Euler run from pure noise (σ_0 = 1): z_T, then the state at each next sigma of the grid
    but the last (σ = 0, the finished image), so there are N states as with DDIM."""
    sigmas = scheduler.sigmas.tolist()
    x = z_T
    yield x
    for i, t in enumerate(scheduler.timesteps[:-1]):
        out = guided(eps, x, t.expand(len(x)).to(x.device), cond, uncond, guidance, batched)
        x = x + (sigmas[i + 1] - sigmas[i]) * out
        yield x


def step_timestep(k: int, scheduler, generator: torch.Generator, rule: str = "band") -> float:
    """The training timestep of an example at DDIM step k: uniform in step k's band (`band_timestep`); for a
    flow-matching model σ·1000 with σ uniform in step k's band of sigmas, [σ of step k, σ of step k + 1) —
    from x_t's own noise level up to the next noisier level of the grid, as DDIM's bands.
    `rule="grid"` (the 2025 code): the sampler's own timestep of step k, x_t's exact noise level; draws nothing."""
    if rule == "grid":
        return float(scheduler.timesteps[len(scheduler.timesteps) - 1 - k])
    if not is_flow(scheduler):
        n, total = len(scheduler.timesteps), scheduler.config.num_train_timesteps
        return band_timestep(k, n, total, generator)
    sigmas = scheduler.sigmas.tolist()[:-1][::-1]  # ascending: element k is step k's level
    low = sigmas[k]
    high = sigmas[k + 1] if k + 1 < len(sigmas) else low  # step N−1 is pure noise: its band is σ_max alone
    return 1000 * (low + (high - low) * float(torch.rand((), generator=generator)))


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
