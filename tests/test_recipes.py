"""Recipes and the one resolution of a run's settings: paper defaults <- recipe <- flags given."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from esd.cli import build_parser, main
from esd.config import HELP_GROUPS, EraseConfig
from esd.errors import EsdError
from esd.flags import given_settings
from esd.recipes import PACKAGE_RECIPES, available, load_recipe, model_notes, resolve
from esd.shipped import testbed_path as shipped_testbed

TESTBED = shipped_testbed()


def folder_with(tmp_path, notes: dict, recipes: dict[str, dict]):
    """A model folder holding only an esd.json and recipes/ (resolution never loads weights)."""
    (tmp_path / "recipes").mkdir(parents=True, exist_ok=True)
    (tmp_path / "esd.json").write_text(json.dumps(notes))
    for name, settings in recipes.items():
        (tmp_path / "recipes" / f"{name}.json").write_text(json.dumps({"description": name, "settings": settings}))
    return tmp_path


@pytest.fixture
def folder(tmp_path):
    return folder_with(tmp_path, {
        "concept_kinds": {"shape": ["circle", "square"], "colour": ["red"]},
        "recipes": {"default": "generic", "shape": "shapes"},
        "robust_recipes": {"shape": "shapes-robust"},
    }, {"generic": {"iterations": 100, "lr": 1e-3}, "shapes": {"iterations": 200, "method": "noxattn"},
        "shapes-robust": {"iterations": 300, "robust": True, "robust_lr": 0.05}})


def test_the_recipe_goes_over_the_paper_and_the_flags_over_the_recipe(folder):
    res = resolve({"concept": "circle", "lr": 0.5}, folder)
    assert (res.recipe.name, res.chosen_by) == ("shapes", "model folder: shape")
    assert (res.config.iterations, res.config.method, res.config.lr, res.config.eta) == (200, "noxattn", 0.5, 1.0)
    assert res.sources["iterations"] == "recipe shapes" and res.sources["lr"] == "flag"
    changes = res.changes(run_fields=False)
    assert set(changes) == {"iterations", "method", "lr"}  # eta etc. are the paper's: not listed
    lines = res.lines()
    assert lines[0].startswith("recipe: shapes (model folder: shape)")
    assert "  lr = 0.5    [flag]" in lines and "  method = 'noxattn'    [recipe shapes]" in lines


def test_a_flag_typed_at_the_papers_value_still_wins_over_the_recipe(folder):
    parser = build_parser()
    args = parser.parse_args(["erase", "--concept", "circle", "--iterations", "1000"])
    given = given_settings(args)
    assert given == {"concept": "circle", "iterations": 1000}  # only what was typed
    assert resolve(given, folder).config.iterations == 1000


@pytest.mark.parametrize(("concept", "separator", "recipe"), [
    ("circle", None, "shapes"), (" Circle ", None, "shapes"), ("circle, square", ",", "shapes"),
    ("a circle", None, "generic"),  # a phrasing, not the word: the default recipe
    ("circle, red", ",", "generic"),  # two kinds: the default recipe
    ("red", None, "generic"),  # a kind without a recipe of its own
    ("dog", None, "generic"),
])
def test_the_model_folder_assigns_a_recipe_per_kind(folder, concept, separator, recipe):
    given = {"concept": concept} | ({"separator": separator} if separator else {})
    assert resolve(given, folder).recipe.name == recipe


def test_robust_takes_the_folders_robust_recipe_and_falls_back_to_its_default(folder):
    res = resolve({"concept": "circle", "robust": True}, folder)
    assert (res.recipe.name, res.config.iterations, res.config.robust_lr) == ("shapes-robust", 300, 0.05)
    assert resolve({"concept": "dog", "robust": True}, folder).recipe.name == "generic"


def test_a_named_recipe_wins_over_the_model_folder(folder, tmp_path):
    res = resolve({"concept": "circle", "recipe": "esd-2025"}, folder)
    assert (res.chosen_by, res.config.sample_from, res.config.timestep, res.config.lr) == (
        "--recipe", "frozen", "grid", 5e-5)
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"description": "d", "settings": {"eta": 2.0}}))
    assert resolve({"concept": "circle", "recipe": str(own)}, folder).config.eta == 2.0


def test_without_a_model_folder_the_paper_runs_unchanged():
    res = resolve({"concept": "Van Gogh"}, None)
    assert res.recipe.name == "paper" and res.changes(run_fields=False) == {}
    assert res.config == EraseConfig(concept="Van Gogh", recipe="paper")


def test_bad_recipes_name_the_problem(folder, tmp_path):
    with pytest.raises(EsdError, match="'nope' is unknown; known: .*esd-2025.*shapes"):
        resolve({"concept": "x", "recipe": "nope"}, folder)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(EsdError, match="bad.json: not valid JSON"):
        load_recipe(str(bad))
    bad.write_text(json.dumps({"settings": {"iteratons": 3}}))
    with pytest.raises(EsdError, match=r"unknown settings \['iteratons'\]"):
        load_recipe(str(bad))
    with pytest.raises(EsdError, match="no such file"):
        load_recipe(str(tmp_path / "missing.json"))
    assert main(["erase", "--concept", "x", "--recipe", "nope"]) == 2


def test_every_shipped_recipe_is_valid_and_says_what_it_is():
    for name, path in available(TESTBED).items():
        recipe = load_recipe(str(path))
        assert recipe.description and recipe.measured, name
        EraseConfig(concept="circle", **recipe.settings).validate()
    assert {"paper", "esd-2025"} <= {p.stem for p in PACKAGE_RECIPES.glob("*.json")}
    paper = load_recipe("paper").settings
    assert all(getattr(EraseConfig(), k) == v for k, v in paper.items())  # the defaults are the paper's


def test_the_testbed_has_one_recipe_per_kind_and_no_per_word_layer():
    notes = model_notes(TESTBED)
    assert set(notes) == {"grid_prompts", "concept_kinds", "recipes", "robust_recipes"}
    names = available(TESTBED)
    for kind, words in notes["concept_kinds"].items():
        for table in ("recipes", "robust_recipes"):
            recipe = load_recipe(notes[table][kind], TESTBED)
            assert recipe.settings["siblings"] == words  # the kind's words; the erased one is skipped when run
            assert recipe.name in names
        for word in words:  # every word of a kind gets exactly its kind's recipe
            assert resolve({"concept": word}).recipe.name == notes["recipes"][kind]


def test_erase_help_is_grouped_by_topic(capsys):
    with pytest.raises(SystemExit):
        main(["erase", "--help"])
    text = capsys.readouterr().out
    for title in HELP_GROUPS:
        assert f"\n{title}:\n" in text
    assert "(default: 1000)" in text and "A recipe goes over them" in text


def test_recipes_command_lists_and_shows(capsys):
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    assert "testbed-shape" in listing and "[model folder: shape]" in listing and "esd-2025" in listing
    assert main(["recipes", "show", "testbed-colour"]) == 0
    shown = capsys.readouterr().out
    assert '"eta": 1.5' in shown and "measured:" in shown


def test_recipe_json_in_the_output_reruns_the_same_weights(tiny_pipe_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_pipe_dir, model)
    folder_with(model, {"concept_kinds": {"shape": ["circle", "square"]}, "recipes": {"shape": "tiny-shape"}},
                {"tiny-shape": {"iterations": 3, "lr": 1e-3, "ddim_steps": 2, "contexts": ["{}", "a red {}"],
                                "siblings": ["circle", "square"], "start_from_sibling": True}})
    first, again = tmp_path / "first", tmp_path / "again"
    assert main(["erase", "--concept", "circle", "--model", str(model), "--seed", "4", "--grid-steps", "0",
                 "--device", "cpu", "--output", str(first)]) == 0
    saved = json.loads((first / "recipe.json").read_text())
    assert saved["settings"]["seed"] == 4 and saved["settings"]["start_from_sibling"] is True
    card = (first / "README.md").read_text()
    assert "Recipe **tiny-shape** (model folder: shape)" in card and "| start_from_sibling | `True` | recipe tiny-shape |" in card
    assert main(["erase", "--recipe", str(first / "recipe.json"), "--device", "cpu", "--output", str(again)]) == 0
    a, b = load_file(first / "esd.safetensors"), load_file(again / "esd.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    with safe_open(str(again / "esd.safetensors"), "pt") as f:
        cfg = EraseConfig.from_json(f.metadata()["esd_config"])
    assert (cfg.iterations, cfg.seed, cfg.concept) == (3, 4, "circle")


def test_grid_timestep_is_the_samplers_own_and_band_draws_inside_the_band():
    import torch
    from diffusers import DDIMScheduler

    from esd.sampling import band_timestep, step_timestep

    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    gen = torch.Generator().manual_seed(0)
    for k in range(10):
        grid = step_timestep(k, scheduler, gen, "grid")
        assert grid == float(scheduler.timesteps[9 - k])  # x_t's own noise level: step k of a 10-step run
        assert 100 * k <= grid < 100 * (k + 1)  # inside the band the 2023 rule draws from
        assert 100 * k <= step_timestep(k, scheduler, gen) < 100 * (k + 1)
    assert band_timestep(0, 10, 1000, gen) < 100


def test_the_card_header_is_read_by_huggingface_hub(tiny_pipe_dir, tmp_path):
    """The card's YAML: library, pipeline tag and tags always; base_model (a Hugging Face id only) and the
    base's license when known."""
    from huggingface_hub import ModelCard

    from esd.artifacts import card_metadata

    out = tmp_path / "run"
    assert main(["erase", "--concept", "a red circle", "--model", str(tiny_pipe_dir), "--iterations", "1",
                 "--ddim-steps", "2", "--grid-steps", "0", "--device", "cpu", "--output", str(out)]) == 0
    card = ModelCard.load(out / "README.md")
    assert (card.data.library_name, card.data.pipeline_tag) == ("diffusers", "text-to-image")
    assert {"esd", "concept-erasure", "stable-diffusion"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local folder is no Hub id
    header = card_metadata(EraseConfig(concept="x", lora_rank=4), "sdxl", "stabilityai/stable-diffusion-xl-base-1.0")
    data = ModelCard(f"---\n{header}\n---\n# x\n").data
    assert data.base_model == "stabilityai/stable-diffusion-xl-base-1.0" and data.license == "openrail++"
    assert {"stable-diffusion-xl", "lora"} <= set(data.tags)


def test_a_method_the_recipe_was_not_measured_with_is_flagged(folder):
    """A recipe names its method: ESD-u over the shape recipe (measured with ESD-x) runs, with a warning."""
    res = resolve({"concept": "circle", "method": "esd-u"}, folder)  # the folder's shape recipe trains noxattn
    assert res.method_warning() is None
    res = resolve({"concept": "circle", "method": "xattn"}, folder)
    assert "measured with --method noxattn; --method xattn runs" in res.lines()[-1]
    assert resolve({"concept": "Van Gogh", "method": "noxattn"}, None).method_warning() is None  # the paper's two
    assert "xattn or noxattn" in resolve({"concept": "Van Gogh", "method": "full"}, None).method_warning()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_devices_without_cuda_names_the_flag_given(tmp_path, capsys):
    assert main(["erase", "--concept", "x", "--devices", "0,1", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--devices: 0 needs CUDA" in err and "--device cuda" not in err and "leave --devices out" in err
    assert not (tmp_path / "out").exists()


def test_the_grid_shows_every_grid_prompt_that_does_not_name_the_concept():
    from esd.artifacts import grid_spec

    cfg = EraseConfig(concept="circle", grid_prompts=["a blue square", "a green circle, outlined", "red", "a dotted x"])
    assert grid_spec(None, cfg) == ["circle", "a blue square", "red", "a dotted x"]  # none cut, none naming circle
