"""Testbed v2 pieces that need no trained model: styles in the renderer, phrasings, the text-separation penalty,
the evaluation's judging and summaries, per-kind recommendations and the opt-in lr schedule / clipping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esd.errors import EsdError
from esd.testbed.captions import caption_table, draw_caption, phrase
from esd.testbed.classifier import Prediction
from esd.testbed.evaluate import CONCEPTS, PromptSpec, check_concept, judge, restrict_seeds, summarise
from esd.testbed.evaluate import testbed_prompts as prompt_list
from esd.testbed.render import COLOURS, FILLS, RGB, SHAPES, SOLID, STYLES, kind_of, render, render_shape
from esd.testbed.text import distinct_penalty, pair_mask, probes, word_position
from esd.tiny import tiny_text_encoder
from esd.tokenizer import clip_tokenizer

# ----------------------------------------------------------------------------- renderer


def test_render_is_deterministic_and_every_label_occurs():
    a, b = render(7), render(7)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a[1:] == b[1:]
    labels = [render(s)[1:] for s in range(300)]
    assert {s for s, _, _ in labels} == set(SHAPES) and {c for _, c, _ in labels} == set(COLOURS)
    assert {y for _, _, y in labels} == set(FILLS)


def _ink(img: np.ndarray) -> np.ndarray:
    """Pixels clearly painted (far from the light background)."""
    return np.abs(img.astype(float) - img[0, 0]).sum(-1) > 150


def test_solid_renders_are_unchanged_by_the_style_argument():
    # Solid images are drawn exactly as the first testbed drew them for the same generator state.
    a = render_shape("circle", "red", np.random.default_rng(3))
    b = render_shape("circle", "red", np.random.default_rng(3), SOLID)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("shape", SHAPES)
def test_styles_paint_less_than_solid_and_differently(shape):
    solid = _ink(render_shape(shape, "blue", np.random.default_rng(0), SOLID))
    for style in STYLES:
        img = render_shape(shape, "blue", np.random.default_rng(0), style)
        ink = _ink(img)
        assert ink.sum() < 0.95 * solid.sum(), style  # light stripes, dots or a hollow centre
        assert (ink & ~solid).sum() <= 4, style  # never outside the same silhouette
        assert np.allclose(np.median(img[ink], axis=0), RGB["blue"], atol=30), style  # fully covered pixels
    # Outlined: the centre of the shape is background; striped/dotted: painted around it.
    h, w = np.argwhere(solid).mean(0).round().astype(int)
    outlined = _ink(render_shape(shape, "blue", np.random.default_rng(0), "outlined"))
    assert not outlined[h - 1 : h + 2, w - 1 : w + 2].any()


def test_striped_alternates_along_the_diagonal():
    img = render_shape("square", "red", np.random.default_rng(1), "striped")
    ink = _ink(img)
    rows, cols = np.nonzero(ink)
    r0, r1, c0, c1 = rows.min() + 3, rows.max() - 3, cols.min() + 3, cols.max() - 3
    inner = ink[r0:r1, c0:c1]
    # Along an anti-diagonal, the painted/unpainted state flips several times (stripes run at 45 degrees).
    line = np.array([inner[i, i] for i in range(min(inner.shape))])
    assert np.count_nonzero(np.diff(line.astype(int))) >= 3


def test_bad_labels_name_the_known_ones():
    with pytest.raises(ValueError, match="striped"):
        render_shape("circle", "red", np.random.default_rng(0), "plaid")
    with pytest.raises(ValueError, match="circle, square, triangle"):
        kind_of("hexagon")
    assert [kind_of(w) for w in ("circle", "red", "dotted")] == ["shape", "colour", "style"]


# ----------------------------------------------------------------------------- captions


def test_phrasings():
    assert phrase("circle", "red", None) == "a red circle"
    assert phrase("circle", "red", "striped") == "a red circle, striped"
    assert [phrase("circle", "red", None, v) for v in range(4)] == [
        "a red circle", "red circle", "circle, red", "a circle, red"]
    assert [phrase("circle", None, None, v) for v in range(2)] == ["a circle", "circle"]
    assert phrase(None, "red", None) == "red" and phrase(None, None, "dotted") == "dotted"
    assert phrase("circle", "red", SOLID) == "a red circle"  # solid is never named
    assert phrase(None, None, None) == ""


def test_draw_caption_names_a_non_solid_style_always_and_stays_in_the_table():
    rng = np.random.default_rng(0)
    table = set(caption_table())
    striped = [draw_caption("circle", "red", "striped", rng) for _ in range(400)]
    solid = [draw_caption("circle", "red", SOLID, rng) for _ in range(400)]
    assert all(c == "" or c.endswith("striped") for c in striped)
    assert not any(y in c for c in solid for y in STYLES)
    assert set(striped) | set(solid) <= table
    assert 0.05 < striped.count("") / 400 < 0.15  # CFG dropout
    assert {"circle", "a red circle", "red circle", "circle, red", "red"} <= set(solid)


# ----------------------------------------------------------------------------- text separation


def test_word_position_finds_multi_token_words():
    tok = clip_tokenizer()
    ids = tok("a red circle, outlined").input_ids
    outlined = tok("outlined").input_ids[1:-1]
    assert len(outlined) == 2  # "out" + "lined": the position is that of the last token
    assert word_position(ids, outlined) == len(ids) - 2
    assert word_position(ids, tok("square").input_ids[1:-1]) is None


def test_probes_cover_every_word_bare_and_in_context():
    prompts, picks = probes()
    labels = [lab for _, _, lab in picks]
    for w in CONCEPTS:
        assert labels.count(w) >= 2, w  # the bare word and at least one context
    assert "eos:" in labels and "eos:circle" in labels
    tok = clip_tokenizer()
    for p, pos, lab in picks:
        if not lab.startswith("eos:"):
            assert tok.decode(tok(prompts[p]).input_ids[pos]).strip() in lab  # the word's (last) token


def test_distinct_penalty_is_mean_squared_cosine_of_different_words():
    v = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    mask = pair_mask(["a", "b", "a"])  # pairs (0,1) and (1,2) differ; (0,2) share a label
    assert mask.sum() == 2
    assert distinct_penalty(v, mask).item() == pytest.approx((0.5 + 0.5) / 2)
    assert distinct_penalty(torch.eye(3), pair_mask(["a", "b", "c"])).item() == 0.0


def test_penalty_gradient_separates_a_random_encoder():
    torch.manual_seed(0)
    enc = tiny_text_encoder(32)
    prompts, picks = probes()
    from esd.testbed.text import probe_vectors
    from esd.tokenizer import padded_ids

    tokens, mask = padded_ids(prompts), pair_mask([lab for _, _, lab in picks])
    opt = torch.optim.Adam(enc.parameters(), lr=1e-2)
    first = None
    for _ in range(15):
        loss = distinct_penalty(probe_vectors(enc, tokens, picks), mask)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


# ----------------------------------------------------------------------------- evaluation


def test_prompt_sets_name_every_concept_and_phrasing():
    full = prompt_list("full")
    texts = [s.prompt for s in full]
    assert len(texts) == len(set(texts))
    for p in ("a red circle", "a red circle, striped", "circle", "a circle", "red circle", "circle, red", "red",
              "striped", "a circle, outlined"):
        assert p in texts, p
    assert len(prompt_list("base")) == 12
    quick = prompt_list("quick")
    assert len(quick) == 34 and {p.prompt for p in quick} <= set(texts)
    assert all(sum(p.style == y for p in quick) == 5 for y in STYLES)  # 4 styled prompts and the bare word
    with pytest.raises(EsdError, match="full, quick, base"):
        prompt_list("huge")


def _pred(shape, colour, style):
    return Prediction(shape, colour, 1.0, 1.0, style, 1.0)


def test_judge_and_summary_count_what_each_prompt_names():
    specs = [PromptSpec("a red circle", "circle", "red"), PromptSpec("a red square, dotted", "square", "red", "dotted"),
             PromptSpec("striped", None, None, "striped")]
    preds = [_pred("circle", "red", "solid"), _pred("none", "red", "striped"),  # circle erased in one of 2
             _pred("square", "red", "dotted"), _pred("square", "green", "solid"),
             _pred("triangle", "blue", "striped"), _pred("circle", "red", "striped")]
    rows = judge(specs, preds, per_prompt=2)
    assert rows["a red circle"]["shape_hits"] == 1 and rows["a red circle"]["style_hits"] == 1  # solid expected
    assert rows["a red square, dotted"]["colour_hits"] == 1 and rows["a red square, dotted"]["style_hits"] == 1
    assert "shape_hits" not in rows["striped"] and rows["striped"]["style_hits"] == 2
    m = summarise(rows, "circle")
    assert m["erased_rate"] == 0.5 and m["erased_kind"] == "shape"
    assert m["per_concept"]["square"] == 1.0 and m["per_concept"]["striped"] == 1.0
    assert m["per_concept"]["red"] == 1 / 2  # only "a red square, dotted": prompts naming circle measure efficacy
    assert summarise(rows, None)["per_concept"]["red"] == 3 / 4
    assert m["shape_accuracy"] == 3 / 4 and m["style_accuracy"] == 4 / 6
    assert "solid" not in m["per_concept"]  # the one prompt expecting solid names the erased circle
    assert m["others_mean_accuracy"] == 1.0 and "triangle" not in m["per_concept"]  # no prompt names triangles


def test_restricting_seeds_judges_exactly_those_images():
    """A group of seeds cut from a bigger run is what a run with only those seeds would have judged."""
    specs = [PromptSpec("a red circle", "circle", "red"), PromptSpec("striped", None, None, "striped")]
    preds = [_pred("circle", "red", "solid"), _pred("square", "red", "solid"), _pred("circle", "green", "dotted"),
             _pred("circle", "red", "striped"), _pred("square", "red", "solid"), _pred("none", "blue", "striped")]
    rows = judge(specs, preds, per_prompt=3)
    for indices in ([0], [1, 2], [2, 0]):
        small = judge(specs, [p for k in range(2) for p in (preds[3 * k + i] for i in indices)], len(indices))
        assert restrict_seeds(rows, indices) == small
    assert summarise(restrict_seeds(rows, [1, 2]), None)["per_concept"]["circle"] == 1 / 2
    assert rows["a red circle"]["n"] == 3  # the full run's rows are left as they were


def test_unknown_concept_names_every_known_word():
    with pytest.raises(EsdError, match="circle, square, triangle, red, green, blue, yellow, striped, dotted, outlined"):
        check_concept("plaid")
    assert check_concept(" Dotted ") == "dotted"
