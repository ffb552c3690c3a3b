"""The ESD training loop (paper Algorithm 1), readable top to bottom.

    repeat `iterations` times:
        w  ~ W                    one concept per iteration
        k  ~ U[0, N)              which DDIM step
        x  = DDIM(ε_θ, s, w) from z_T till step k       (no grad; ε* with --sample-from frozen)
        t  ~ U(band of step k)
        target = ε*(x,t,"") − η (ε*(x,t,w) − ε*(x,t,""))     Eq. 5
        Adam step on θ to minimise ‖ε_θ(x,t,w) − target‖²
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from esd import __version__
from esd.config import ETA_CONVENTION, EraseConfig
from esd.errors import NonFiniteLossError
from esd.frozen import copied_denoiser, original_values, swapped_denoiser
from esd.loss import esd_loss, esd_target
from esd.models import default_image_size, encode_prompt, load_pipeline, resolve_device, save_esd_weights
from esd.params import select_parameters
from esd.sampling import Cond, Denoiser, band_timestep, ddim_scheduler, sample_until, unet_denoiser


@dataclass
class Example:
    """One training example of Algorithm 1: the sampled x_t, its timestep t and the Eq. 5 target."""

    concept: str
    k: int  # DDIM step the sampler stopped at
    x_t: torch.Tensor  # (1, 4, h, w)
    t: torch.Tensor  # (1,)
    prompt: Cond  # what ε_θ is conditioned on: the concept, or the erase-from context
    target: torch.Tensor  # (1, 4, h, w)


@dataclass
class EraseResult:
    output: Path
    losses: list[float] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)  # parameter names
    seconds: float = 0.0
    stopped_early: bool = False
    compvis: Path | None = None  # the CompVis single file, with --save-compvis


def esd_metadata(cfg: EraseConfig, pipe, step: int, trained: list[str]) -> dict[str, str]:
    """What goes into the safetensors header: the whole config, the base model and versions."""
    import diffusers

    return {
        "format": "esd-unet-subset",
        "esd_config": cfg.to_json(),
        "base_model": str(getattr(pipe, "esd_source", cfg.model)),
        "method": cfg.method,
        "concepts": " | ".join(cfg.concepts),
        "eta_convention": ETA_CONVENTION,
        "step": str(step),
        "trained_parameters": str(sum(pipe.unet.get_parameter(n).numel() for n in trained)),
        "esd_version": __version__,
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
    }


@torch.no_grad()
def draw_example(cfg: EraseConfig, conds: dict[str, Cond], sampler: Denoiser, frozen: Denoiser, scheduler,
                 latent_shape: tuple[int, ...], rng: random.Random, gen: torch.Generator) -> Example:
    """Draw w, k and z_T, sample x_t till step k, pick t in step k's band, build the Eq. 5 target."""
    null = conds[""]
    w = rng.choice(cfg.concepts)
    prompt = conds[cfg.erase_from] if cfg.erase_from else conds[w]  # conditions x_t and ε_θ
    k = int(torch.randint(cfg.ddim_steps, (1,), generator=gen))
    device = null.embeds.device
    z_T = torch.randn(latent_shape, generator=gen).to(device, null.embeds.dtype)
    x_t = sample_until(sampler, scheduler, z_T, prompt, null, cfg.start_guidance, k)
    t = torch.tensor([band_timestep(k, cfg.ddim_steps, scheduler.config.num_train_timesteps, gen)], device=device)
    eps_null = frozen(x_t, t, null)
    eps_concept = frozen(x_t, t, conds[w])
    eps_context = frozen(x_t, t, prompt) if cfg.erase_from else None
    return Example(w, k, x_t, t, prompt, esd_target(eps_null, eps_concept, cfg.eta, eps_context))


def erase(cfg: EraseConfig, pipe=None, progress: bool = True,
          on_step: Callable[[int, float], bool | None] | None = None) -> EraseResult:
    """Run ESD with `cfg` and write the outputs. `on_step(i, loss)` may return True to stop early.

    A given `pipe` is trained in place (its UNet ends up erased); otherwise `cfg.model` is loaded.
    """
    cfg.validate()
    device = resolve_device(cfg.devices.split(",")[0] if cfg.devices else cfg.device)
    pipe = pipe if pipe is not None else load_pipeline(cfg.model, device, config=cfg.config)
    out = Path(cfg.output or cfg.default_output())
    unet = pipe.unet.to(device).eval()  # eval: no dropout; gradients still flow to θ
    params = select_parameters(unet, cfg.method)  # θ; everything else frozen
    trained_names = list(params)

    # ε*: the original values of θ swapped in per call (one UNet), or a real copy on a second device.
    if cfg.devices:
        frozen = copied_denoiser(unet, resolve_device(cfg.devices.split(",")[1]))
    else:
        frozen = swapped_denoiser(unet, original_values(params))
    trained = unet_denoiser(unet)
    sampler = trained if cfg.sample_from == "esd" else frozen

    size = cfg.image_size or default_image_size(pipe)
    latent_shape = (1, unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    scheduler = ddim_scheduler(pipe.scheduler.config, cfg.ddim_steps)
    # Text embeddings once per prompt, not per iteration (the text encoder is frozen).
    prompts = {"", *cfg.concepts, *([cfg.erase_from] if cfg.erase_from else [])}
    conds = {p: encode_prompt(pipe, p, size) for p in prompts}

    from esd.artifacts import before_images, write_outputs  # plotting/imaging only when needed

    before = before_images(pipe, cfg, size)
    optimizer = torch.optim.Adam(params.values(), lr=cfg.lr)
    rng = random.Random(cfg.seed)  # concept draws
    gen = torch.Generator().manual_seed(cfg.seed)  # k, t and noise: CPU generator, same on every device
    result = EraseResult(output=out, trained=trained_names)
    start = time.perf_counter()

    bar = tqdm(range(cfg.iterations), desc=f"ESD {cfg.method}", disable=not progress)
    for i in bar:
        ex = draw_example(cfg, conds, sampler, frozen, scheduler, latent_shape, rng, gen)
        loss = esd_loss(trained(ex.x_t, ex.t, ex.prompt), ex.target)
        if not torch.isfinite(loss):
            bar.close()
            raise NonFiniteLossError(f"loss is {loss.item()} at iteration {i + 1}; stopped. "
                                     f"{out / 'esd.safetensors'} keeps the last good checkpoint, if any. "
                                     "Try a smaller --lr or --eta.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        result.losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}", concept=ex.concept[:20])
        if cfg.save_every and (i + 1) % cfg.save_every == 0 and i + 1 < cfg.iterations:
            save_esd_weights(out / "esd.safetensors", params, esd_metadata(cfg, pipe, i + 1, trained_names))
        if on_step is not None and on_step(i, loss.item()):
            result.stopped_early = True
            break

    result.seconds = time.perf_counter() - start
    steps = len(result.losses)
    save_esd_weights(out / "esd.safetensors", params, esd_metadata(cfg, pipe, steps, trained_names))
    if cfg.save_compvis:
        from esd.compvis import export_pipeline

        result.compvis = export_pipeline(pipe, out / f"compvis.{cfg.compvis_format}", base_file=cfg.model)
    write_outputs(out, cfg, pipe, result, before, size)
    return result
