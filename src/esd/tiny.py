"""Tiny Stable-Diffusion-architecture pipelines built in-process (random weights, offline).

Used by the tests and the benchmarks: the same classes as the real models (so every code path is the
real one), a few hundred thousand parameters (so a test runs in seconds on a CPU).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from esd.tokenizer import clip_tokenizer

TEXT_DIM = 32


def tiny_unet(cross_attention_dim: int = TEXT_DIM, sample_size: int = 8, **overrides) -> UNet2DConditionModel:
    """An SD1.x-layout UNet: cross-attention down/up blocks, so attn1/attn2 and every method exist."""
    config = dict(
        sample_size=sample_size,  # latent side; the image is 8x larger with the tiny VAE below
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config)


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamples: factor 8, as SD's VAE
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )


def tiny_text_encoder(hidden_size: int = TEXT_DIM) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def tiny_scheduler() -> DDIMScheduler:
    # SD's own schedule: plain DDIM from pure noise works with it (DESIGN.md §5).
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        num_train_timesteps=1000,
    )


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A complete SD1.x-layout pipeline, 64x64 px images, random weights from `seed`."""
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(),
        tokenizer=clip_tokenizer(),
        unet=tiny_unet(),
        scheduler=tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
