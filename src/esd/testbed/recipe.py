"""The testbed's training recipe: its settings, its models, its data and one training step of each phase.

`train.py` runs these in order (docs/design.md, "The testbed"); everything here is drawn from (seed, step),
so a run resumed from its checkpoint draws the same batches as an unbroken one.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from esd.testbed.captions import caption_table, draw_caption
from esd.testbed.render import COLOURS, FILLS, SHAPES, SIZE, render_batch
from esd.testbed.text import distinct_penalty, pair_mask, probes
from esd.tiny import sd_pipeline, tiny_scheduler, tiny_text_encoder
from esd.tokenizer import padded_ids

VAE_FACTOR = 2  # 32 px -> 16x16 latents: shapes stay distinct, the UNet stays cheap
LATENT_SIZE = SIZE // VAE_FACTOR


@dataclass
class TrainConfig:
    """Every setting of a testbed training run; saved in the checkpoint and the model card."""

    # model
    unet_channels: tuple[int, ...] = (32, 64, 128)  # ~3.2 M UNet parameters at 16x16 latents
    text_dim: int = 64  # CLIP hidden size = the UNet's cross_attention_dim
    text_layers: int = 4  # a deeper encoder than 2 layers binds colour words reliably (docs/design.md, "The testbed")
    vae_channels: tuple[int, ...] = (32, 64)  # two blocks = one downsample = factor 2
    # data
    pool_size: int = 40_000  # rendered once from the seed; ~120 MB as uint8
    p_empty: float = 0.1  # "" captions: classifier-free guidance dropout
    p_name: float = 0.75  # each of shape and colour is named with this probability (a style always is)
    p_solid: float = 0.4  # share of plain solid fills; the rest is striped, dotted or outlined uniformly
    distinct_weight: float = 0.1  # weight of the text encoder's concept-word separation penalty (text.py)
    warm_start: str | None = None  # a testbed folder whose VAE, text encoder and UNet start the run
    # VAE phase
    vae_steps: int = 2000
    vae_batch_size: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6  # as SD's VAE: a nearly deterministic autoencoder with a smooth latent
    vae_time_share: float = 0.2  # at most this share of the time budget goes to the VAE
    # diffusion phase
    batch_size: int = 256  # the shipped testbed's; use 32-64 on a CPU
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    # side tasks
    checkpoint_minutes: float = 5.0
    sample_every: int = 1000  # steps between sample grids (EMA weights, guidance 7.5)
    sample_seeds: int = 4  # columns of a sample grid (rows: the 12 "a {colour} {shape}" prompts)
    sample_steps: int = 25  # DDIM steps of a sample grid
    classifier_steps: int = 2000
    classifier_pool: int = 20_000  # renders the classifier trains on (augmented anew every step)
    eval_seeds: int = 16  # seeds per prompt of the final quality measurement
    eval_steps: int = 50
    extra: dict = field(default_factory=dict)  # free-form notes recorded in the card


# ----------------------------------------------------------------------------- models


def build_vae(cfg: TrainConfig) -> AutoencoderKL:
    """A small AutoencoderKL with SD's block types; factor 2**(len(channels)-1)."""
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=SIZE,
    )


def build_text_encoder(cfg: TrainConfig) -> CLIPTextModel:
    """A small CLIP text model with the real vocabulary (49,408) and 77 positions, as SD1.x."""
    return tiny_text_encoder(cfg.text_dim, intermediate_size=4 * cfg.text_dim, num_hidden_layers=cfg.text_layers)


def build_unet(cfg: TrainConfig) -> UNet2DConditionModel:
    """An SD1.x-layout UNet (cross-attention down/up blocks + cross-attention mid block) at 16x16 latents."""
    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,  # the pipeline's default image side is sample_size * VAE factor = 32 px
        in_channels=4,
        out_channels=4,
        block_out_channels=cfg.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cfg.text_dim,
        attention_head_dim=4,  # diffusers reads this as the number of heads, as in SD1.x's config
        norm_num_groups=8,
    )


def build_scheduler() -> DDIMScheduler:
    """SD's own noise schedule: with it plain DDIM from pure noise works (a cosine schedule did not, §5)."""
    return tiny_scheduler()


def build_pipeline(
    vae: AutoencoderKL, text_encoder: CLIPTextModel, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    """Wrap the parts in a diffusers pipeline (no safety checker: the testbed draws shapes)."""
    return sd_pipeline(vae, text_encoder, unet, build_scheduler())


def warm_start(folder: str | Path, vae, text_encoder, unet, ema_text, ema_unet) -> None:
    """Start from a trained testbed's weights (same architecture): VAE, text encoder and UNet, EMA copies too."""
    source = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    for target, part in ((vae, source.vae), (text_encoder, source.text_encoder), (unet, source.unet),
                         (ema_text, source.text_encoder), (ema_unet, source.unet)):
        target.load_state_dict(part.state_dict())
    print(f"warm start from {folder}", file=sys.stderr)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- data


def render_pool(n: int, seed: int, p_solid: float = 0.4) -> tuple[torch.Tensor, ...]:
    """The training images, (n, 3, S, S) uint8, with shape, colour and style indices (n,); fixed by the seed."""
    images, shapes, colours, styles = render_batch(n, np.random.default_rng([seed, 1]), p_solid)
    return (
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        torch.from_numpy(shapes),
        torch.from_numpy(colours),
        torch.from_numpy(styles),
    )


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range the VAE works in."""
    return images.float() / 127.5 - 1


def step_generator(seed: int, phase: int, step: int) -> torch.Generator:
    """A CPU generator fixed by (seed, phase, step): a resumed run draws the same batches as an unbroken one."""
    return torch.Generator().manual_seed(seed * 1_000_003 + phase * 100_000_007 + step)


@functools.cache
def caption_index() -> dict[str, int]:
    """Caption text -> row of the token table."""
    return {text: i for i, text in enumerate(caption_table())}


def choose_captions(cfg: TrainConfig, labels: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """Caption indices into `caption_table()` (B,) for a batch of (shape, colour, style) index rows (B, 3)."""
    index = caption_index()
    rng = np.random.default_rng([seed, 4, step])  # fixed by (seed, step): a resumed run draws the same captions
    return torch.tensor([
        index[draw_caption(SHAPES[s], COLOURS[c], FILLS[y], rng, cfg.p_empty, cfg.p_name)] for s, c, y in labels.tolist()
    ])


# ----------------------------------------------------------------------------- training steps


def vae_step(
    vae: AutoencoderKL,
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    pool: torch.Tensor,
    step: int,
    seed: int,
    device: str,
) -> float:
    """One autoencoder step: reconstruction MSE + a tiny KL to keep the latent smooth for diffusion."""
    g = step_generator(seed, 1, step)
    idx = torch.randint(len(pool), (cfg.vae_batch_size,), generator=g)
    x = to_unit(pool[idx]).to(device)  # (B, 3, 32, 32)
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(device)
    recon = vae.decode(z).sample
    loss = F.mse_loss(recon, x) + cfg.vae_kl_weight * posterior.kl().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


@torch.no_grad()
def encode_pool(
    vae: AutoencoderKL, pool: torch.Tensor, device: str, batch: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every pool image, (n, 4, 16, 16) each; latents are sampled per step from them."""
    means, stds = [], []
    for i in range(0, len(pool), batch):
        dist = vae.encode(to_unit(pool[i : i + batch]).to(device)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def latent_scale(mean: torch.Tensor, std: torch.Tensor) -> float:
    """SD's `scaling_factor`: 1 / std of the latents, so the diffusion works on unit-variance data."""
    return float(1.0 / torch.sqrt(mean.var() + std.pow(2).mean()))


def probe_data(device: str) -> dict:
    """Tokens, positions and pair mask of the concept-word vectors the separation penalty compares."""
    prompts, picks = probes()
    return {
        "probe_tokens": padded_ids(prompts).to(device),
        "probe_rows": torch.tensor([p for p, _, _ in picks], device=device),
        "probe_cols": torch.tensor([c for _, c, _ in picks], device=device),
        "probe_mask": pair_mask([lab for _, _, lab in picks]).to(device),
    }


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then constant: training may stop at any time budget without a horizon."""
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """EMA of the weights; the decay ramps up so that the average is not dominated by the random init."""
    d = min(decay, (1 + step) / (10 + step))
    ema_p = [p for p in ema.parameters()]
    torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1 - d)


def diffusion_step(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    data: dict[str, torch.Tensor],
    step: int,
    seed: int,
    device: str,
) -> float:
    """One ε-prediction step on text encoder + UNet: x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, loss ||ε - ε_θ(x_t, c, t)||²."""
    g = step_generator(seed, 2, step)
    b = cfg.batch_size
    idx = torch.randint(len(data["mean"]), (b,), generator=g)
    cap = choose_captions(cfg, data["labels"][idx], seed, step)
    idx_d = idx.to(device)
    x0 = data["mean"][idx_d] + data["std"][idx_d] * torch.randn((b, 4, LATENT_SIZE, LATENT_SIZE), generator=g).to(
        device
    )
    x0 = x0 * data["scale"]  # (B, 4, 16, 16), unit variance
    eps = torch.randn(x0.shape, generator=g).to(device)
    t = torch.randint(0, 1000, (b,), generator=g).to(device)
    alpha_bar = data["alphas_cumprod"][t].view(b, 1, 1, 1)
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    cond = text_encoder(data["tokens"][cap.to(device)])[0]  # (B, 77, D)
    loss = F.mse_loss(unet(x_t, t, cond).sample, eps)
    if cfg.distinct_weight > 0:  # keep concept words apart in the encoder's output (text.py)
        hidden = text_encoder(data["probe_tokens"])[0]
        vectors = hidden[data["probe_rows"], data["probe_cols"]]
        loss = loss + cfg.distinct_weight * distinct_penalty(vectors, data["probe_mask"])
    for group in opt.param_groups:
        group["lr"] = lr_at(cfg, step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], cfg.grad_clip)
    opt.step()
    return loss.item()


def latent_data(vae: AutoencoderKL, cfg: TrainConfig, pool, labels, state: dict, device: str) -> dict:
    """Everything a diffusion step draws from: pool latents, labels, caption tokens, the noise schedule."""
    mean, std = encode_pool(vae, pool, device)
    state["scaling_factor"] = latent_scale(mean, std)
    vae.register_to_config(scaling_factor=state["scaling_factor"])  # the pipeline divides latents by it
    return {
        "mean": mean,
        "std": std,
        "scale": state["scaling_factor"],
        "labels": labels,  # (n, 3): shape, colour, style indices
        "tokens": padded_ids(caption_table()).to(device),
        **probe_data(device),
        "alphas_cumprod": build_scheduler().alphas_cumprod.to(device),
    }
