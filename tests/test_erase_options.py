"""Opt-in erase options: the cosine lr schedule and gradient clipping. (Recipes: test_recipes.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from esd.config import EraseConfig
from esd.erase import lr_factor
from esd.errors import EsdError


def test_cosine_schedule_decays_to_zero_and_constant_stays():
    cfg = EraseConfig(concept="x", iterations=100, lr_schedule="cosine")
    assert lr_factor(cfg, 0) == 1.0 and lr_factor(cfg, 50) == pytest.approx(0.5)
    assert lr_factor(cfg, 100) == pytest.approx(0.0, abs=1e-12)
    assert all(lr_factor(cfg, i) >= lr_factor(cfg, i + 1) for i in range(100))
    assert lr_factor(EraseConfig(concept="x", iterations=100), 99) == 1.0


def test_bad_schedule_or_clip_is_refused():
    with pytest.raises(EsdError, match="--grad-clip"):
        EraseConfig(concept="x", grad_clip=-1.0).validate()
    with pytest.raises(EsdError, match="--grad-clip"):
        EraseConfig(concept="x", grad_clip=math.nan).validate()
    with pytest.raises(EsdError, match="--lr-schedule"):
        EraseConfig(concept="x", lr_schedule="linear").validate()


def test_grad_clip_bounds_the_update_and_the_schedule_is_recorded(tiny_pipe, tmp_path):
    from safetensors import safe_open

    from esd.erase import erase

    def moved(**kw) -> float:
        before = {n: p.detach().clone() for n, p in tiny_pipe.unet.named_parameters()}
        cfg = EraseConfig(concept="a red circle", iterations=2, ddim_steps=2, lr=1e-2, grid_steps=0, device="cpu",
                          save_every=0, output=str(tmp_path / str(len(kw))), **kw)
        erase(cfg, pipe=tiny_pipe, progress=False)
        change = max((p.detach() - before[n]).abs().max().item() for n, p in tiny_pipe.unet.named_parameters())
        with torch.no_grad():  # put the UNet back for the next run
            for n, p in tiny_pipe.unet.named_parameters():
                p.copy_(before[n])
        return change

    free = moved()
    # A gradient clipped to a norm far below Adam's epsilon barely moves θ: the clip is applied before the step.
    clipped = moved(grad_clip=1e-12, lr_schedule="cosine")
    assert free > 1e-3 and clipped < 1e-3 * free
    with safe_open(str(tmp_path / "2" / "esd.safetensors"), "pt") as f:
        cfg = EraseConfig.from_json(f.metadata()["esd_config"])
    assert (cfg.grad_clip, cfg.lr_schedule) == (1e-12, "cosine")
