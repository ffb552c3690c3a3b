"""The testbed: renderer, shipped classifier and pipeline, evaluation, CLI and a few training steps (CPU, offline)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from esd.errors import EsdError
from esd.models import apply_esd_weights, load_pipeline
from esd.testbed import COLOURS, DEFAULT_TESTBED, SHAPES
from esd.testbed.classifier import COLOUR_LABELS, SHAPE_LABELS, STYLE_LABELS, load_classifier
from esd.testbed.cli import register, run
from esd.testbed.evaluate import evaluate_testbed
from esd.testbed.render import FILLS, RGB, STYLES, render, render_shape
from esd.tokenizer import clip_tokenizer

needs_testbed = pytest.mark.skipif(
    not (DEFAULT_TESTBED / "model_index.json").is_file(), reason="models/testbed not in this checkout"
)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(str(DEFAULT_TESTBED))


# ----------------------------------------------------------------------------- renderer


@pytest.mark.parametrize("shape", SHAPES)
def test_render_draws_the_colour_on_a_light_background(shape):
    rng = np.random.default_rng(0)
    img = render_shape(shape, "blue", rng).astype(float)
    background = img[0, 0]
    assert background.min() > 200  # plain light background
    ink = np.abs(img - background).sum(-1) > 150  # pixels well inside the shape
    assert 0.15 < ink.mean() < 0.6  # the shape fills a good part of the frame
    assert np.allclose(img[ink].mean(0), RGB["blue"], atol=30)
    edges = (np.abs(img - background).sum(-1) > 10) & ~ink
    assert edges.any()  # anti-aliased: intermediate values at the edges


# ----------------------------------------------------------------------------- classifier


@needs_testbed
def test_shipped_classifier_is_accurate_per_head_on_fresh_renders():
    clf = load_classifier(DEFAULT_TESTBED / "classifier")
    samples = [render(seed) for seed in range(10_000, 10_600)]  # seeds the classifier never trained on
    preds = clf.classify([ex.image for ex in samples])
    for head in ("shape", "colour", "style"):
        acc = np.mean([getattr(p, head) == getattr(ex, head) for p, ex in zip(preds, samples, strict=True)])
        assert acc >= 0.98, head
    for style in FILLS:  # every fill, not just the common solid one
        rows = [(p, ex) for p, ex in zip(preds, samples, strict=True) if ex.style == style]
        assert len(rows) > 50 and np.mean([p.style == style for p, _ in rows]) >= 0.97, style
    assert all(0 <= p.shape_prob <= 1 and 0 <= p.colour_prob <= 1 and 0 <= p.style_prob <= 1 for p in preds)
    assert preds[0].shape in SHAPE_LABELS and preds[0].colour in COLOUR_LABELS and preds[0].style in STYLE_LABELS
    blank = clf.classify([Image.fromarray(render_shape(None, None, np.random.default_rng(5)))])[0]
    assert (blank.shape, blank.colour, blank.style) == ("none", "none", "none")


def test_first_generation_classifier_is_refused_with_the_fix(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text(json.dumps(
        {"width": 32, "shape_labels": list(SHAPE_LABELS), "colour_labels": list(COLOUR_LABELS)}))
    with pytest.raises(EsdError, match="no style head"):
        load_classifier(tmp_path)


def test_missing_classifier_says_how_to_get_one(tmp_path):
    with pytest.raises(EsdError, match="esd testbed train"):
        load_classifier(tmp_path)


# ----------------------------------------------------------------------------- shipped pipeline


@needs_testbed
def test_shipped_pipeline_loads_offline_and_draws_32px(pipe):
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    sched = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and sched.beta_schedule == "scaled_linear"
    assert (sched.beta_start, sched.beta_end, sched.steps_offset, sched.clip_sample) == (0.00085, 0.012, 1, False)
    names = list(pipe.unet.state_dict())
    for pattern in ("attn1", "attn2", "time_embedding", "conv_out", "up_blocks.1.attentions"):
        assert any(pattern in n for n in names), pattern
    assert pipe.tokenizer("a red circle").input_ids == clip_tokenizer()("a red circle").input_ids
    assert pipe.text_encoder.config.vocab_size == 49408 and pipe.text_encoder.config.max_position_embeddings == 77
    size = sum(f.stat().st_size for f in DEFAULT_TESTBED.rglob("*") if f.is_file())
    assert size <= 40 * 2**20


# ----------------------------------------------------------------------------- evaluation and CLI


@needs_testbed
def test_eval_writes_metrics(pipe, tmp_path):
    m = evaluate_testbed(pipe, tmp_path, erased="circle", seeds_per_prompt=1, steps=2)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["erased"] == "circle" and (tmp_path / "grid.png").is_file()
    for key in ("shape_accuracy", "colour_accuracy", "erased_rate", "others_mean_accuracy"):
        assert 0 <= saved[key] <= 1, key
    assert set(saved["per_concept"]) == set(SHAPES + COLOURS + STYLES) | {"solid"}
    assert all(0 <= v <= 1 for v in saved["per_concept"].values())
    assert len(saved["per_prompt"]) == 94 and saved["n_images"] == 94
    assert saved["by_phrasing"]["{shape}"].keys() == {"shape", "style"}  # a bare shape word constrains no colour
    assert m["erased_rate"] == saved["per_concept"]["circle"]
    assert m["others_mean_accuracy"] == pytest.approx((m["per_concept"]["square"] + m["per_concept"]["triangle"]) / 2)


@needs_testbed
def test_eval_rejects_bad_inputs(pipe, tmp_path):
    with pytest.raises(EsdError, match="circle, square, triangle"):
        evaluate_testbed(pipe, tmp_path, erased="dog", seeds_per_prompt=1, steps=1)
    with pytest.raises(EsdError, match="esd testbed train"):
        evaluate_testbed(pipe, tmp_path, erased=None, seeds_per_prompt=1, steps=1, classifier_path=tmp_path / "nowhere")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="esd")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@needs_testbed
def test_cli_eval_with_unet_weights(tmp_path, capsys):
    # A weights file holding part of the UNet, as an erased model's is: loaded over the base model.
    state = load_pipeline(str(DEFAULT_TESTBED)).unet.state_dict()
    save_file({k: v.contiguous() for k, v in state.items() if "attn2" in k}, tmp_path / "unet.safetensors")
    args = parse(
        [
            "testbed",
            "eval",
            "--weights",
            str(tmp_path / "unet.safetensors"),
            "--erased",
            "red",
            "--seeds",
            "1",
            "--steps",
            "1",
            "--output",
            str(tmp_path / "ev"),
        ]
    )
    assert args.run is run and run(args) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["erased"] == "red"
    assert "metrics.json" in capsys.readouterr().out


@needs_testbed
def test_load_pipeline_rejects_foreign_weights(tmp_path):
    save_file({"not.a.unet.key": torch.zeros(1)}, tmp_path / "bad.safetensors")
    unet = load_pipeline(str(DEFAULT_TESTBED)).unet
    with pytest.raises(EsdError, match="not parameters of this UNet"):
        apply_esd_weights(unet, tmp_path / "bad.safetensors")
    with pytest.raises(EsdError, match="no such file"):
        apply_esd_weights(unet, tmp_path / "missing.safetensors")


def test_load_pipeline_rejects_non_diffusers_folder(tmp_path):
    with pytest.raises(EsdError, match="model_index.json"):
        load_pipeline(str(tmp_path))


def test_cli_train_arguments():
    args = parse(
        ["testbed", "train", "--seed", "3", "--minutes", "2.5", "--device", "cpu", "--output", "x", "--max-steps", "10"]
    )
    assert (args.seed, args.minutes, args.device, str(args.output), args.max_steps) == (3, 2.5, "cpu", "x", 10)


@needs_testbed
def test_cli_eval_unknown_word_exits_2_naming_the_known_ones(tmp_path, capsys):
    from esd.cli import main

    assert main(["testbed", "eval", "--erased", "plaid", "--seeds", "1", "--steps", "1", "--device", "cpu",
                 "--output", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "unknown testbed concept 'plaid'" in err and "striped, dotted, outlined" in err
    assert not (tmp_path / "ev" / "metrics.json").exists()


@needs_testbed
def test_cli_eval_leads_with_the_erased_concept_and_records_the_weights_it_judged(tmp_path, capsys):
    """The summary answers "is it gone?" first; metrics.json names the weights file (path and sha256)."""
    import json

    from esd.cli import main
    from esd.evaluate.provenance import sha256_file

    weights = tmp_path / "erased" / "esd.safetensors"
    assert main(["erase", "--concept", "circle", "--iterations", "1", "--ddim-steps", "2", "--grid-steps", "0",
                 "--device", "cpu", "--output", str(weights.parent)]) == 0
    capsys.readouterr()
    assert main(["testbed", "eval", "--weights", str(weights), "--erased", "circle", "--seeds", "1", "--steps", "1",
                 "--prompt-set", "quick", "--device", "cpu", "--output", str(tmp_path / "ev")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"judged {weights}") and lines[1].startswith("erased 'circle': still drawn in ")
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert (m["judged"]["weights"], m["judged"]["weights_sha256"]) == (str(weights.resolve()), sha256_file(weights))
    assert m["judged"]["model"]


def test_testbed_eval_runs_the_quick_protocol_unless_full_is_asked(monkeypatch, tmp_path, capsys):
    """The quick start's evaluation: 2 seeds x 10 steps by default; --full is 16 x 50; --seeds/--steps go over."""
    from esd.cli import main
    from esd.testbed import FULL, QUICK
    from esd.testbed import evaluate as evaluate_module

    asked = []

    def fake(pipe, output, erased, seeds_per_prompt, steps, **kw):  # records what the command asks for
        asked.append((seeds_per_prompt, steps))
        return {"n_images": 94 * seeds_per_prompt, "seeds_per_prompt": seeds_per_prompt, "steps": steps,
                "erased": None, **{f"{k}_accuracy": 1.0 for k in ("shape", "colour", "style")}}

    monkeypatch.setattr(evaluate_module, "evaluate_testbed", fake)
    for extra in ([], ["--full"], ["--full", "--seeds", "2"]):
        assert main(["testbed", "eval", "--device", "cpu", "--output", str(tmp_path), *extra]) == 0
    assert asked == [QUICK, FULL, (2, FULL[1])] and QUICK == (2, 10) and FULL == (16, 50)
    out = capsys.readouterr().out
    assert "2 seeds × 10 steps, the quick protocol; --full for 16 seeds x 50 steps" in out
    assert "16 seeds × 50 steps, the full protocol" in out
