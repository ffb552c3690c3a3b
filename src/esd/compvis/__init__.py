"""CompVis (LDM) single-file checkpoints in and out.

CompVis -> diffusers goes through diffusers' own single-file loaders, fed with the local configs in
`esd/configs/` so nothing is fetched from the hub. diffusers -> CompVis is ours: diffusers ships no
such converter, so `diffusers_to_compvis` maps every tensor by walking the model's blocks (any block
count, layers per block or transformer depth), for SD1.x, SD2.x and SDXL.

Modules, in the order a file travels through them:
  reading   read a file safely (format sniffing, `weights_only` pickles), tell its family, pick EMA weights
  keys      diffusers <-> CompVis tensor names
  loading   a CompVis file -> a diffusers pipeline (offline, checked against the config first)
  saving    a pipeline -> a CompVis file (atomic, optionally keeping the original's other tensors); `convert`

Layout of a CompVis Stable Diffusion file (keys are prefixes):
  model.diffusion_model.*                 UNet (openaimodel.UNetModel)
  model_ema.<name without dots>           optional EMA copy of the UNet (LitEma flattens names)
  first_stage_model.*                     VAE (encoder/decoder/quant_conv/post_quant_conv)
  cond_stage_model.transformer.*          SD1.x: OpenAI CLIP ViT-L/14 (a transformers CLIPTextModel)
  cond_stage_model.model.*                SD2.x: OpenCLIP ViT-H/14 text tower
  conditioner.embedders.0.transformer.*   SDXL: CLIP ViT-L/14
  conditioner.embedders.1.model.*         SDXL: OpenCLIP ViT-bigG/14 (with text_projection)
"""

from esd.compvis.keys import (
    TEXT_PREFIXES,
    clip_to_compvis,
    diffusers_to_compvis,
    openclip_to_compvis,
    text_encoders_to_compvis,
    unet_key_map,
    unet_to_compvis,
    vae_to_compvis,
)
from esd.compvis.loading import (
    CONFIGS,
    FAMILIES,
    YAML,
    check_layout,
    load_single_file,
    meta_pipeline,
    pipeline_from_state_dict,
    resolve_config,
)
from esd.compvis.reading import (
    COMPVIS_SUFFIXES,
    EMA_PREFIX,
    PICKLE_SUFFIXES,
    UNET_PREFIX,
    VAE_PREFIX,
    detect_family,
    ema_key,
    has_ema,
    read_checkpoint,
    use_ema_weights,
)
from esd.compvis.saving import (
    TO_CHOICES,
    convert,
    export_pipeline,
    save_compvis,
    warn_if_sd2_incomplete,
    write_pipeline,
)

__all__ = [
    "COMPVIS_SUFFIXES", "CONFIGS", "EMA_PREFIX", "FAMILIES", "PICKLE_SUFFIXES", "TEXT_PREFIXES", "TO_CHOICES",
    "UNET_PREFIX", "VAE_PREFIX", "YAML", "check_layout", "clip_to_compvis", "convert", "detect_family",
    "diffusers_to_compvis", "ema_key", "export_pipeline", "has_ema", "load_single_file", "meta_pipeline",
    "openclip_to_compvis", "pipeline_from_state_dict", "read_checkpoint", "resolve_config", "save_compvis",
    "text_encoders_to_compvis", "unet_key_map", "unet_to_compvis", "use_ema_weights", "vae_to_compvis",
    "warn_if_sd2_incomplete", "write_pipeline",
]
