"""SD3/SD3.5, FLUX.1 and FLUX.2 single files: the transformer from the file, the rest from a pipeline (`--config`).

Stability's and Black Forest Labs' release files, community fine-tunes and ComfyUI's `models/diffusion_models/`
hold the transformer alone: FLUX's text encoders and VAE ship as separate files, SD3.5's text encoders too. So
the other components come from a diffusers pipeline of the same family, named by `--config` (a local folder,
offline, or a Hugging Face id). diffusers' `from_single_file` reads the file under that pipeline's transformer
config and maps the original key names (`joint_blocks.*`, `double_blocks.*`, with or without ComfyUI's
`model.diffusion_model.` prefix) to its own; a file already under diffusers names (what `esd convert` writes
for ComfyUI) is taken as it is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from esd.compvis.reading import first_keys
from esd.errors import EsdError

TRANSFORMER_CLASSES = {"SD3/SD3.5": "SD3Transformer2DModel", "FLUX.1": "FluxTransformer2DModel",
                       "FLUX.2": "Flux2Transformer2DModel"}
EXAMPLE_PIPELINES = {"SD3/SD3.5": "stabilityai/stable-diffusion-3.5-medium", "FLUX.1": "black-forest-labs/FLUX.1-dev",
                     "FLUX.2": "black-forest-labs/FLUX.2-dev"}


def _check_pipeline(config: str, path: Path, family: str) -> None:
    """The `--config` pipeline's model_index.json (a folder offline, or a hub id) names this family's transformer."""
    from diffusers import DiffusionPipeline

    folder = Path(config).expanduser()
    if folder.is_file():
        raise EsdError(f"--config {config}: for an {family} single file, pass the diffusers pipeline (folder or "
                       "Hugging Face id) that supplies its text encoders, VAE and scheduler, not a file")
    try:
        index = DiffusionPipeline.load_config(str(folder) if folder.is_dir() else config)
    except (OSError, ValueError) as err:
        raise EsdError(f"--config {config}: not a diffusers pipeline folder or reachable Hugging Face id ({err})") from err
    expected = TRANSFORMER_CLASSES[family]
    have = (index.get("transformer") or [None, None])[1]
    if have != expected:
        raise EsdError(f"{path}: an {family} transformer, but --config {config} is a {index.get('_class_name')} "
                       f"(transformer: {have}); pass a pipeline of the same family, e.g. {EXAMPLE_PIPELINES[family]}")


def load_transformer_file(path: Path, tensors: dict[str, Tensor], family: str, config: str | None,
                          torch_dtype: torch.dtype = torch.float32):
    """The `--config` pipeline with its transformer's weights taken from the single file at `path`."""
    import diffusers

    if config is None:
        raise EsdError(f"{path}: an {family} single file holds the transformer only (the text encoders and VAE "
                       "ship separately); pass --config with the diffusers pipeline to take them from, a folder "
                       f"or a Hugging Face id (e.g. --config {EXAMPLE_PIPELINES[family]})")
    _check_pipeline(config, path, family)
    local = Path(config).expanduser().is_dir()
    source = str(Path(config).expanduser()) if local else config
    cls = getattr(diffusers, TRANSFORMER_CLASSES[family])
    dtype = {} if torch_dtype == torch.float32 else {"torch_dtype": torch_dtype}
    try:
        transformer = cls.from_single_file(tensors, config=source, subfolder="transformer",
                                           local_files_only=local, **dtype)
    except (KeyError, RuntimeError, ValueError) as err:  # the converters' and load_state_dict's errors
        raise EsdError(f"{path}: its tensors do not fit the transformer of --config {config} ({err}); is it "
                       "the same model (e.g. FLUX.1-dev vs schnell, SD3 vs SD3.5)?") from err
    missing = [n for n, p in transformer.named_parameters() if p.device.type == "meta"]
    if missing:
        raise EsdError(f"{path}: lacks {len(missing)} tensors of the transformer of --config {config}: "
                       f"{first_keys(missing)}; a truncated file, or a different model?")
    own = set(transformer.state_dict())
    if own <= set(tensors) and set(tensors) - own:  # diffusers names with extras: not this transformer
        extra = sorted(set(tensors) - own)
        raise EsdError(f"{path}: holds {len(extra)} tensors the transformer of --config {config} has no place for: "
                       f"{first_keys(extra)}")
    return diffusers.DiffusionPipeline.from_pretrained(source, transformer=transformer, local_files_only=local, **dtype)
