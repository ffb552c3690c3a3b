"""Tiny Stable-Diffusion-architecture pipelines built in-process (random weights, offline).

Used by the tests and the benchmarks: the same classes as the real models (so every code path is the
real one), a few hundred thousand parameters (so a test runs in seconds on a CPU).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

# Assembling an SD pipeline and SD's noise schedule are not tiny: they live in esd.models. They stay
# importable from here under their old names (sd_pipeline, tiny_scheduler) for esd.testbed.recipe.
from esd.models import sd_pipeline, sd_scheduler
from esd.models import sd_scheduler as tiny_scheduler  # noqa: F401  (the re-export above)
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


def tiny_text_encoder(hidden_size: int = TEXT_DIM, **overrides) -> CLIPTextModel:
    """A small CLIP text model with the real vocabulary (49,408) and 77 positions, as SD's; `overrides` win."""
    config = dict(
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
    return CLIPTextModel(CLIPTextConfig(**{**config, **overrides}))


def tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A complete SD1.x-layout pipeline, 64x64 px images, random weights from `seed`."""
    torch.manual_seed(seed)
    return sd_pipeline(tiny_vae(), tiny_text_encoder(), tiny_unet())


def tiny_layout(n_blocks: int = 2, layers_per_block: int = 1, xl: bool = False) -> dict:
    """UNet overrides for `n_blocks` resolution levels, each `layers_per_block` resnets deep.

    SD1.x/SD2.x put cross-attention everywhere but at the lowest resolution; SDXL leaves it out at
    the highest resolution instead. Used to test key mappings on non-default layouts.
    """
    widths = tuple(32 * min(2**i, 2) for i in range(n_blocks))  # 32, 64, 64, ...: stays tiny
    if xl:
        down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_blocks - 1)
    else:
        down = ("CrossAttnDownBlock2D",) * (n_blocks - 1) + ("DownBlock2D",)
    up = tuple(t.replace("Down", "Up") for t in reversed(down))
    return dict(block_out_channels=widths, layers_per_block=layers_per_block, down_block_types=down, up_block_types=up)


def tiny_sd2_pipeline(
    v_prediction: bool = True, seed: int = 0, n_blocks: int = 2, layers_per_block: int = 1
) -> StableDiffusionPipeline:
    """An SD2.x-layout pipeline: OpenCLIP-style text encoder, linear transformer projections, v or ε.

    diffusers models SD2's OpenCLIP ViT-H text tower as a `CLIPTextModel` with plain GELU (OpenAI's
    CLIP uses quick-GELU); `attention_head_dim` is a per-block tuple (it holds head counts there).
    """
    torch.manual_seed(seed)
    layout = tiny_layout(n_blocks, layers_per_block)
    heads = tuple(w // 16 for w in layout["block_out_channels"])
    unet = tiny_unet(use_linear_projection=True, attention_head_dim=heads, **layout)
    text_encoder = tiny_text_encoder(hidden_act="gelu")
    scheduler = DDIMScheduler.from_config(
        sd_scheduler().config, prediction_type="v_prediction" if v_prediction else "epsilon"
    )
    # SD2's tokenizer pads with "!" (id 0), not <|endoftext|>
    return sd_pipeline(tiny_vae(), text_encoder, unet, scheduler, tokenizer=clip_tokenizer(pad_token="!"))


TEXT_DIM_2 = 48  # differs from TEXT_DIM: diffusers tells SDXL's two encoders apart by width
TIME_EMBED_DIM = 8  # SDXL uses 256 per micro-conditioning scalar; 6 scalars


def tiny_sdxl_pipeline(seed: int = 0, n_blocks: int = 2, layers_per_block: int = 1):
    """An SDXL-layout pipeline: CLIP-L-style + OpenCLIP-bigG-style encoders, text_time embedding."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    layout = tiny_layout(n_blocks, layers_per_block, xl=True)
    heads = tuple(max(w // 16, 1) for w in layout["block_out_channels"])
    unet = tiny_unet(
        cross_attention_dim=TEXT_DIM + TEXT_DIM_2,  # the two encoders' hidden states, concatenated
        use_linear_projection=True,
        attention_head_dim=heads,
        transformer_layers_per_block=tuple(1 + (i == n_blocks - 1) for i in range(n_blocks)),  # deeper at low res, as SDXL
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_DIM_2,  # time ids + pooled text
        **layout,
    )
    config_2 = tiny_text_encoder(TEXT_DIM_2, hidden_act="gelu", projection_dim=TEXT_DIM_2).config
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(),
        text_encoder_2=CLIPTextModelWithProjection(config_2),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=sd_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd1_layout_unet() -> UNet2DConditionModel:
    """SD1.x's exact block structure (4 levels, 2 layers per block, 16 transformer blocks), tiny widths.

    Parameter names match SD1.4's one for one, so the layer-specific methods (xlayer, selflayer)
    select what they select on the real model.
    """
    return tiny_unet(
        block_out_channels=(16, 16, 16, 16),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=4,
    )


def tiny_t5_encoder():
    """A 2-layer T5 encoder over `esd.tokenizer.t5_tokenizer()`'s vocabulary, 32 wide."""
    from transformers import T5Config, T5EncoderModel

    from esd.tokenizer import t5_tokenizer

    config = T5Config(vocab_size=len(t5_tokenizer()), d_model=TEXT_DIM, d_kv=8, d_ff=2 * TEXT_DIM, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0)
    return T5EncoderModel(config).eval()  # as from_pretrained gives it: no dropout


def tiny_flow_vae() -> AutoencoderKL:
    """SD3/FLUX's VAE layout: 16 latent channels, no quant convs, a shift and scale of the latents."""
    vae = tiny_vae()
    return AutoencoderKL(**{**vae.config, "latent_channels": 16, "use_quant_conv": False,
                            "use_post_quant_conv": False, "shift_factor": 0.0609, "scaling_factor": 1.5035})


def tiny_sd3_pipeline(seed: int = 0, t5: bool = True):
    """An SD3-layout pipeline (MMDiT transformer, CLIP-L + CLIP-G + T5, flow-matching Euler with shift 3),
    64x64 px images, random weights. `t5=False`: without the T5 encoder, as SD3 may be run."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from esd.tokenizer import t5_tokenizer

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=TEXT_DIM, caption_projection_dim=TEXT_DIM,
        pooled_projection_dim=2 * TEXT_DIM,  # the two CLIP encoders' pooled outputs, concatenated
        pos_embed_max_size=16,
    )
    clip_l = CLIPTextModelWithProjection(tiny_text_encoder(projection_dim=TEXT_DIM).config)
    clip_g = CLIPTextModelWithProjection(tiny_text_encoder(projection_dim=TEXT_DIM, hidden_act="gelu").config)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_flow_vae(),
        text_encoder=clip_l, tokenizer=clip_tokenizer(), text_encoder_2=clip_g, tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=tiny_t5_encoder() if t5 else None, tokenizer_3=t5_tokenizer() if t5 else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A FLUX.1-layout pipeline (double- and single-stream blocks, CLIP-L pooled + T5 sequence, flow matching
    with resolution-dependent shift), 64x64 px images, random weights. `guidance_embeds`: dev (True) or
    schnell (False)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from esd.tokenizer import t5_tokenizer

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=tiny_flow_vae(),
                        text_encoder=tiny_text_encoder(), tokenizer=clip_tokenizer(),
                        text_encoder_2=tiny_t5_encoder(), tokenizer_2=t5_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_qwen3_encoder(vocab_size: int):
    """A Qwen3 causal LM 16 wide with 27 layers: FLUX.2 klein's pipeline stacks the hidden states of layers
    9, 18 and 27 as its text embedding (3 x 16 = 48 wide here)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=27,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512)
    return Qwen3ForCausalLM(config).eval()


def tiny_flux2_pipeline(seed: int = 0, distilled: bool = False):
    """A FLUX.2 [klein]-layout pipeline (Flux2Transformer2DModel: double- and single-stream blocks, 4-axis
    position ids; a Qwen3 text encoder; the FLUX.2 VAE with 32 latent channels taken as 2x2 patches; flow
    matching with the pipeline's empirical shift), 64x64 px images, random weights. `distilled`: the
    step-distilled klein (no classifier-free guidance) instead of the base model."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )

    from esd.tokenizer import qwen_tokenizer

    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer()
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )
    vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
                             up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=32, norm_num_groups=4,
                             layers_per_block=1, sample_size=64)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096,
                                                time_shift_type="exponential")
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=tiny_qwen3_encoder(len(tokenizer)),
                              tokenizer=tokenizer, transformer=transformer, is_distilled=distilled)
    pipe.set_progress_bar_config(disable=True)
    return pipe
