"""Opt-in erase options and model-folder recommendations: the cosine lr schedule, gradient clipping, and
settings an esd.json recommends for a kind of concept."""

from __future__ import annotations

import math

import pytest
import torch

from esd.config import EraseConfig
from esd.erase import lr_factor
from esd.errors import EsdError
from esd.models import recommended_settings

NOTES = {"erase_defaults": {"iterations": 100, "lr": 1e-3},
         "concept_kinds": {"shape": ["circle", "square"], "colour": ["red"]},
         "erase_defaults_by_kind": {"shape": {"method": "noxattn"}, "colour": {"lr": 5e-4}}}


@pytest.mark.parametrize(("concepts", "kind", "expected"), [
    (["circle"], "shape", {"iterations": 100, "lr": 1e-3, "method": "noxattn"}),
    (["a Circle, please"], "shape", {"iterations": 100, "lr": 1e-3, "method": "noxattn"}),
    (["red"], "colour", {"iterations": 100, "lr": 5e-4}),
    (["a red circle"], None, {"iterations": 100, "lr": 1e-3}),  # two kinds: the generic settings
    (["dog"], None, {"iterations": 100, "lr": 1e-3}),
    (["circle", "square"], "shape", {"iterations": 100, "lr": 1e-3, "method": "noxattn"}),
])
def test_recommended_settings_by_kind(concepts, kind, expected):
    assert recommended_settings(NOTES, concepts) == (expected, kind)
    assert recommended_settings({}, concepts) == ({}, None)


def test_a_word_of_its_own_overrides_its_kind_when_erased_alone():
    notes = {**NOTES, "erase_defaults_by_word": {"red": {"lr": 1e-4, "sample_from": "frozen"}}}
    assert recommended_settings(notes, [" Red"]) == ({"iterations": 100, "lr": 1e-4, "sample_from": "frozen"},
                                                      "colour")
    assert recommended_settings(notes, ["circle"])[0] == NOTES["erase_defaults"] | {"method": "noxattn"}
    assert recommended_settings(notes, ["red", "red"])[0]["lr"] == 5e-4  # several concepts: the kind's settings


def test_recommended_phrasings_apply_to_the_bare_word_only():
    notes = {**NOTES, "erase_defaults_by_kind": {"shape": {"method": "noxattn", "contexts": ["{}", "a {}"]}}}
    assert recommended_settings(notes, ["Circle"])[0]["contexts"] == ["{}", "a {}"]
    chosen, kind = recommended_settings(notes, ["a circle"])  # "a {}" would make "a a circle"
    assert kind == "shape" and chosen["method"] == "noxattn" and "contexts" not in chosen


def test_the_kinds_other_words_are_held_in_the_same_phrasings():
    notes = {**NOTES, "concept_kinds": {"shape": ["circle", "square", "triangle"], "colour": ["red"]},
             "erase_defaults_by_kind": {"shape": {"contexts": ["{}", "a {}"]}, "colour": {}}}
    assert recommended_settings(notes, ["circle"])[0]["siblings"] == ["square", "triangle"]
    assert recommended_settings(notes, ["circle", "Square"])[0]["siblings"] == ["triangle"]
    assert "siblings" not in recommended_settings(notes, ["a circle"])[0]  # no phrasings: nothing to hold them in
    assert "siblings" not in recommended_settings(notes, ["red"])[0]  # the kind erases the bare word only
    own = {**notes, "erase_defaults_by_kind": {"shape": {"contexts": ["{}"], "siblings": ["square"]}}}
    assert recommended_settings(own, ["circle"])[0]["siblings"] == ["square"]


def test_robust_settings_go_over_the_words_only_with_robust():
    notes = {**NOTES, "erase_defaults_by_word": {"circle": {"iterations": 300, "eta": 2.0}},
             "erase_defaults_robust": {"iterations": 450}}
    assert recommended_settings(notes, ["circle"]) == ({"iterations": 300, "lr": 1e-3, "method": "noxattn",
                                                        "eta": 2.0}, "shape")
    assert recommended_settings(notes, ["circle"], robust=True) == ({"iterations": 450, "lr": 1e-3,
                                                                     "method": "noxattn", "eta": 2.0}, "shape")
    assert recommended_settings(notes, ["dog"], robust=True) == ({"iterations": 450, "lr": 1e-3}, None)
    assert recommended_settings(NOTES, ["circle"], robust=True) == recommended_settings(NOTES, ["circle"])


def test_robust_settings_of_a_kind_go_over_the_robust_ones_for_that_kind_only():
    notes = {**NOTES, "concept_kinds": {"shape": ["circle"], "style": ["striped"]},
             "erase_defaults_by_kind": {"style": {"retain_weight": 8.0}},
             "erase_defaults_robust": {"iterations": 450},
             "erase_defaults_robust_by_kind": {"shape": {"retain_weight": 6.0, "iterations": 500}}}
    shape, _ = recommended_settings(notes, ["circle"], robust=True)
    style, _ = recommended_settings(notes, ["striped"], robust=True)
    assert (shape["retain_weight"], shape["iterations"]) == (6.0, 500)
    assert (style["retain_weight"], style["iterations"]) == (8.0, 450)  # the style's own hold is kept
    assert "retain_weight" not in recommended_settings(notes, ["circle"])[0]  # only with --robust
    assert recommended_settings(notes, ["dog"], robust=True)[0]["iterations"] == 450  # no kind: no kind's entry


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
