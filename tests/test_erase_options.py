"""Opt-in erase options: the cosine lr schedule and gradient clipping. (Recipes: test_recipes.py.)"""

from __future__ import annotations

import pytest

from esd.config import EraseConfig
from esd.erase import lr_factor
from esd.errors import EsdError


def test_cosine_schedule_decays_to_zero_and_constant_stays():
    cfg = EraseConfig(concept="x", iterations=100, lr_schedule="cosine")
    assert lr_factor(cfg, 0) == 1.0 and lr_factor(cfg, 50) == pytest.approx(0.5)
    assert lr_factor(cfg, 100) == pytest.approx(0.0, abs=1e-12)
    assert all(lr_factor(cfg, i) >= lr_factor(cfg, i + 1) for i in range(100))
    assert lr_factor(EraseConfig(concept="x", iterations=100), 99) == 1.0


def test_bad_schedule_is_refused():
    with pytest.raises(EsdError, match="--lr-schedule"):
        EraseConfig(concept="x", lr_schedule="linear").validate()


def test_the_schedule_is_recorded_and_configs_with_removed_options_still_load(tiny_pipe, tmp_path):
    """--grad-clip, --anchor-siblings, --text-retain-weight and --robust-timesteps are gone (no recipe used them;
    docs/results.md): a weights file written before still loads, the removed fields dropped."""
    import dataclasses
    import json

    from safetensors import safe_open

    from esd.erase import erase

    cfg = EraseConfig(concept="a red circle", iterations=2, ddim_steps=2, lr=1e-2, grid_steps=0, device="cpu",
                      save_every=0, lr_schedule="cosine", output=str(tmp_path / "run"))
    erase(cfg, pipe=tiny_pipe, progress=False)
    with safe_open(str(tmp_path / "run" / "esd.safetensors"), "pt") as f:
        saved = EraseConfig.from_json(f.metadata()["esd_config"])
    assert saved.lr_schedule == "cosine" and saved.gradient_checkpointing in (True, False)  # "auto"s resolved
    assert saved == dataclasses.replace(cfg, precision="fp32", gradient_checkpointing=saved.gradient_checkpointing)
    old = json.loads(cfg.to_json()) | {"grad_clip": 1.0, "anchor_siblings": True, "text_retain_weight": 10.0,
                                       "robust_timesteps": "0:1000"}
    assert EraseConfig.from_json(json.dumps(old)) == cfg
