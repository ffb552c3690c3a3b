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
