"""Shared fixtures: tiny SD-architecture pipelines built in-process; nothing touches a hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # any accidental download fails loudly instead of hanging
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def tiny_pipe():
    from esd.tiny import tiny_sd_pipeline

    return tiny_sd_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory):
    """A tiny SD1.x pipeline saved as a diffusers folder, as a user's --model would be."""
    from esd.tiny import tiny_sd_pipeline

    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """`saved(name)`: a tiny pipeline of that family saved as a diffusers folder, built once per session."""
    from esd import tiny

    builders = {"sd2-v": tiny.tiny_sd2_pipeline, "sdxl": tiny.tiny_sdxl_pipeline, "sd3": tiny.tiny_sd3_pipeline,
                "flux": tiny.tiny_flux_pipeline, "flux-schnell": lambda: tiny.tiny_flux_pipeline(guidance_embeds=False),
                "flux2": tiny.tiny_flux2_pipeline, "flux2-distilled": lambda: tiny.tiny_flux2_pipeline(distilled=True)}
    cache = {}

    def get(name: str):
        if name not in cache:
            path = tmp_path_factory.mktemp(name) / "pipe"
            builders[name]().save_pretrained(path)
            cache[name] = path
        return cache[name]

    return get
