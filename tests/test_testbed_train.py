"""Testbed training on a tiny model for a few CPU steps: checkpoint on Ctrl-C, resume, ship a loadable pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

import esd.testbed.train as tb
from esd.testbed.train import TrainConfig, train_testbed

TINY = dict(
    unet_channels=(16, 32),
    text_dim=16,
    text_layers=1,
    vae_channels=(16, 16),
    pool_size=64,
    vae_steps=2,
    vae_batch_size=4,
    batch_size=4,
    warmup_steps=2,
    sample_every=1000,
    sample_seeds=1,
    sample_steps=2,
    classifier_steps=2,
    classifier_pool=64,
    eval_seeds=0,  # the evaluation has its own tests
)


def test_interrupt_checkpoints_and_resume_matches_an_unbroken_run(tmp_path, monkeypatch):
    real_step = tb.diffusion_step
    calls = []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # Ctrl-C during the third diffusion step
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(tb, "diffusion_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        train_testbed(tmp_path / "a", max_steps=4, config=TrainConfig(**TINY))
    state = json.loads((tmp_path / "a" / "checkpoint" / "state.json").read_text())
    assert (state["vae_step"], state["vae_done"], state["step"]) == (2, True, 2)
    assert torch.load(tmp_path / "a" / "checkpoint" / "optimizer.pt", weights_only=True)["diffusion"]["state"]

    monkeypatch.setattr(tb, "diffusion_step", real_step)
    out = train_testbed(tmp_path / "a", max_steps=4, config=TrainConfig(**TINY))
    assert not (out / "checkpoint").exists()  # the shipped folder holds only the pipeline
    card = (out / "README.md").read_text()
    assert "--max-steps 4" in card and "--vae-steps 2" in card
    assert "How far apart the text encoder keeps concept words" in card and "concept tokens, same kind" in card
    assert (out / "classifier" / "model.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, local_files_only=True)
    assert pipe.vae.config.scaling_factor != 1.0  # measured from the latents
    assert pipe("a red circle", num_inference_steps=2).images[0].size == (32, 32)

    # Same seed, no interruption: the same weights, bit for bit (batches are drawn from (seed, step)).
    unbroken = train_testbed(tmp_path / "b", max_steps=4, config=TrainConfig(**TINY))
    for name in (
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ):
        assert (out / name).read_bytes() == (unbroken / name).read_bytes(), name


def test_warm_start_begins_from_the_given_testbed(tmp_path):
    first = train_testbed(tmp_path / "a", max_steps=2, config=TrainConfig(**TINY))
    # No further steps: the warm-started run ships exactly the weights it started from.
    second = train_testbed(tmp_path / "b", max_steps=0, config=TrainConfig(**{**TINY, "vae_steps": 0,
                                                                              "warm_start": str(first)}))
    a = StableDiffusionPipeline.from_pretrained(first, safety_checker=None, local_files_only=True)
    b = StableDiffusionPipeline.from_pretrained(second, safety_checker=None, local_files_only=True)
    for part in ("unet", "text_encoder", "vae"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), part
    assert f"--warm-start {first}" in (second / "README.md").read_text()
