"""The app's handlers on the shipped testbed, without a browser (tests/test_app_browser.py drives the page)."""

import dataclasses
import json
import os

import pytest
import torch

pytest.importorskip("gradio", reason="the app needs Gradio: pip install -e '.[app]'")

from esd import app as A  # noqa: E402  (the page and the command)
from esd import app_form as F  # noqa: E402  (the erase form)
from esd import app_runs as R  # noqa: E402  (run folders)
from esd import app_state as S  # noqa: E402  (the model, erase, compare, export, evaluate)
from esd.config import METHOD_CHOICES, EraseConfig  # noqa: E402
from esd.errors import EsdError  # noqa: E402
from esd.recipes import resolve  # noqa: E402
from esd.weights import applied_weights  # noqa: E402

# A short erase: a few iterations of a 3-step sampler, no before/after grid, no intermediate saves.
QUICK = {"concept": "circle", "method": "xattn", "iterations": 4, "eta": 1.0, "start_guidance": 3.0,
         "lr": 1e-3, "seed": 0, "ddim_steps": 3, "grid_steps": 0, "save_every": 0}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from esd.models import load_pipeline

    return S.EsdApp(load_pipeline(None), tmp_path_factory.mktemp("app-out"))


@pytest.fixture(scope="module")
def finished_run(app):
    """One short erase shared by the tests that need a run; returns (job, xattn values before the erase)."""
    before = {n: p.detach().clone() for n, p in app.pipe.unet.named_parameters() if "attn2" in n}
    job = app.start_erase(dict(QUICK))
    assert job.done.wait(120), "the short erase did not finish"
    assert job.error is None, job.error
    return job, before


def _wait(job, timeout: float = 120) -> None:
    assert job.done.wait(timeout), "erase did not finish"
    assert job.error is None, job.error


def test_form_is_built_from_erase_config():
    defaults = {f.name: f.default for f in dataclasses.fields(EraseConfig)}
    specs = {name: (kind, default, help_text, choices)
             for name, kind, default, help_text, choices in F.config_fields(F.FORM_FIELDS + F.ADVANCED_FIELDS)}
    assert set(specs) == set(F.FORM_FIELDS + F.ADVANCED_FIELDS)
    for name, (_, default, help_text, _) in specs.items():
        assert default == defaults[name] and help_text  # same default, help text from the field metadata
    assert specs["method"][3] == METHOD_CHOICES
    assert specs["iterations"][0] is int and specs["lr"][0] is float and specs["separator"][0] is str


def test_form_starts_blank_so_the_recipe_decides_and_lists_the_recipes(app):
    specs = {name: (default, help_text, choices)
             for name, _, default, help_text, choices in app.form_fields(F.FORM_FIELDS + F.ADVANCED_FIELDS)}
    assert specs["iterations"][0] is None and "blank: the recipe's; paper: 1000" in specs["iterations"][1]
    assert specs["method"][2][0] == "" and specs["robust"][0] is False  # "" in a list: the recipe's choice
    assert "testbed-shape" in specs["recipe"][2] and "esd-2025" in specs["recipe"][2] and specs["recipe"][0] is None


def test_blank_fields_take_the_recipe_and_filled_ones_win_as_flags_do(app):
    """One resolution for the app and `esd erase`: the model folder's recipe for the concept's kind, and each
    filled field over it; the finished message and the card say which recipe gave what."""
    blank = {name: None for name in F.FORM_FIELDS + F.ADVANCED_FIELDS} | {"concept": "circle", "robust": False}
    job = app.start_erase(blank | {"iterations": 3, "ddim_steps": 3, "grid_steps": 0, "save_every": 0})
    assert job.resolution.recipe.name == "testbed-shape" and job.cfg.start_from_sibling and job.cfg.lr == 2e-3
    _wait(job)
    assert len(job.result.losses) == 3 and "Recipe `testbed-shape` (model folder: shape)" in A.job_status(job)
    card = (app.output_dir / job.run_name / "README.md").read_text()
    assert "| iterations | `3` | flag |" in card and "| lr | `0.002` | recipe testbed-shape |" in card
    # a recipe picked by name; the paper's value typed by hand still counts as given
    named = app.start_erase(blank | {"concept": "circle", "recipe": "esd-2025", "iterations": 2, "ddim_steps": 3,
                                     "lr": 1e-5, "grid_steps": 0, "save_every": 0})
    assert (named.cfg.sample_from, named.cfg.timestep, named.cfg.lr) == ("frozen", "grid", 1e-5)
    _wait(named)
    with pytest.raises(EsdError, match="unknown"):  # names only: a path from the browser is refused
        app.start_erase(blank | {"recipe": "/etc/passwd.json"})


def test_form_validation_goes_through_erase_config(tmp_path):
    given = F.given_from_form({**QUICK, "separator": "", "erase_from": " "}, tmp_path / "run", "cpu")
    assert "separator" not in given and "erase_from" not in given and given["output"] == str(tmp_path / "run")
    for bad, words in [({"lr": "fast"}, "lr"), ({"iterations": 2.5}, "whole"),
                       ({"output": "/etc"}, "not settable"), ({"device": "cuda"}, "not settable")]:
        with pytest.raises(EsdError, match=words):
            F.given_from_form({**QUICK, **bad}, tmp_path / "run", "cpu")
    for bad, words in [({"concept": " "}, "concept"), ({"method": "xatn"}, "method"), ({"lr": 0}, "lr"),
                       ({"eta": float("nan")}, "eta"), ({"iterations": F.MAX_ITERATIONS + 1}, "at most"),
                       ({"ddim_steps": 10_000}, "at most")]:
        with pytest.raises(EsdError, match=words):
            F.check_caps(resolve(F.given_from_form({**QUICK, **bad}, tmp_path / "run", "cpu"), None).config)


def test_erase_writes_a_run_and_restores_the_base_weights(app, finished_run):
    job, before = finished_run
    run = app.output_dir / job.run_name
    assert len(job.losses) == len(job.result.losses) == QUICK["iterations"]
    assert {p.name for p in R.run_files(run)} == {"esd.safetensors", "README.md", "recipe.json", "loss.png"}
    assert R.list_runs(app.output_dir)[0] == job.run_name
    cfg, meta = R.run_metadata(run)
    assert cfg.concept == "circle" and meta["step"] == str(QUICK["iterations"])
    after = dict(app.pipe.unet.named_parameters())
    assert all(torch.equal(value, after[n]) for n, value in before.items()), "base UNet not restored"
    assert "Finished" in A.job_status(job) and "4 of 4" in A.job_status(job)
    assert list(A.loss_frame(job.losses)["loss"]) == job.losses


def test_a_robust_erase_of_the_text_encoder_restores_it_and_compare_applies_it(app, finished_run):
    from safetensors.torch import load_file

    encoder = {n: p.detach().clone() for n, p in app.pipe.text_encoder.named_parameters()}
    job = app.start_erase({**QUICK, "iterations": 2, "robust": True, "train_text_encoder": True})
    _wait(job)
    written = load_file(str(app.output_dir / job.run_name / "esd.safetensors"))
    assert any(k.startswith("text_encoder.") for k in written)
    assert all(torch.equal(p, encoder[n]) for n, p in app.pipe.text_encoder.named_parameters())
    with applied_weights(app.pipe, app.output_dir / job.run_name / "esd.safetensors"):
        changed = [n for n, p in app.pipe.text_encoder.named_parameters() if not torch.equal(p, encoder[n])]
    assert changed  # the app's way of applying a run sets the text encoder too


def test_compare_original_and_erased_same_seeds(app, finished_run):
    job, _ = finished_run
    original, erased, verdicts = app.compare(job.run_name, "a red circle", seed=3, steps=4, per_prompt=1)
    unrelated = app.unrelated_prompts(["circle"])
    assert unrelated and len(original) == len(erased) == 1 + len(unrelated)
    assert [c for _, c in original] == [c for _, c in erased]
    assert original[0][1] == "a red circle · seed 3"
    assert not any("circle" in c for _, c in original[1:])  # unrelated prompts avoid the concept
    assert original[0][0].size == (32, 32)
    assert len(verdicts) == len(original) and all(len(row) == 4 for row in verdicts)
    # lr 1e-3 for 4 steps changes the cross-attention enough to change the concept image.
    assert original[0][0].tobytes() != erased[0][0].tobytes()
    again, _, _ = app.compare(job.run_name, "a red circle", seed=3, steps=4, per_prompt=1)
    assert again[0][0].tobytes() == original[0][0].tobytes(), "the base weights were not restored after compare"


def test_a_new_run_fills_the_compare_prompt_unless_the_user_typed_one():
    assert A.compare_prompt("", "", "circle") == "circle"  # first run: the concept
    assert A.compare_prompt("circle", "circle", "square") == "square"  # the tab's own fill follows the run
    assert A.compare_prompt("a red circle", "circle", "square") == "a red circle"  # typed by the user: kept
    assert A.compare_prompt("  ", "circle", "square") == "square"


def test_caps_on_image_counts(app, finished_run):
    job, _ = finished_run
    for steps, per_prompt in [(0, 1), (S.MAX_SAMPLE_STEPS + 1, 1), (5, S.MAX_IMAGES_PER_PROMPT + 1)]:
        with pytest.raises(EsdError, match="steps must be"):
            app.compare(job.run_name, "a circle", 0, steps, per_prompt)
    with pytest.raises(EsdError, match="seeds must be"):
        app.evaluate(job.run_name, seeds=S.MAX_EVAL_SEEDS + 1, steps=5)
    with pytest.raises(EsdError, match="no erased model"):
        app.compare("", "a circle", 0, 5, 1)
    with pytest.raises(EsdError, match="no erased model"):
        app.evaluate("", 1, 5)


def test_stop_keeps_progress_and_one_erase_at_a_time(app, finished_run):
    job = app.start_erase({**QUICK, "iterations": 200, "concept": "square"})
    try:
        with pytest.raises(EsdError, match="already running"):
            app.start_erase(dict(QUICK))
        with pytest.raises(EsdError, match="busy"):
            app.compare(finished_run[0].run_name, "a square", 0, 2, 1)
        while not job.losses and not job.done.is_set():
            job.done.wait(0.05)
    finally:
        assert "Stopping" in app.request_stop()
    _wait(job)
    assert job.result.stopped_early and 1 <= len(job.losses) < 200
    cfg, meta = R.run_metadata(app.output_dir / job.run_name)
    assert meta["step"] == str(len(job.losses)) and cfg.iterations == 200
    assert "stopped early" in A.job_status(job)
    assert app.request_stop() == "No erase is running."
    assert app.lock.acquire(blocking=False), "the lock was not released"
    app.lock.release()


def test_erase_error_is_reported_and_frees_the_model(app, monkeypatch):
    import esd.erase
    from esd.errors import NonFiniteLossError

    def failing(cfg, pipe, progress, on_step, resolution):
        with torch.no_grad():  # a half-trained UNet must be put back all the same
            next(p for n, p in pipe.unet.named_parameters() if "attn2" in n).add_(1.0)
        raise NonFiniteLossError("loss is nan at iteration 3")

    before = {n: p.detach().clone() for n, p in app.pipe.unet.named_parameters()}
    monkeypatch.setattr(esd.erase, "erase", failing)
    job = app.start_erase(dict(QUICK))
    assert job.done.wait(30)
    assert "loss not finite" in A.job_status(job) and "nan" in A.job_status(job)
    assert all(torch.equal(before[n], p) for n, p in app.pipe.unet.named_parameters())
    assert app.lock.acquire(blocking=False), "the lock was not released"
    app.lock.release()


def test_runs_are_addressed_by_name_inside_the_output_folder(app, finished_run, tmp_path):
    job, _ = finished_run
    assert R.resolve_run(app.output_dir, job.run_name).parent == app.output_dir
    for name in ["", ".", "..", "../x", "/etc", f"{job.run_name}/../{job.run_name}", "nope"]:
        with pytest.raises(EsdError):
            R.resolve_run(app.output_dir, name)
    # A link from the output folder to a run elsewhere is refused, and so is a linked file inside a run.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "esd.safetensors").write_bytes(b"x")
    os.symlink(outside, app.output_dir / "linked")
    with pytest.raises(EsdError):
        R.resolve_run(app.output_dir, "linked")
    assert "linked" not in R.list_runs(app.output_dir)
    run = app.output_dir / job.run_name
    os.symlink("/etc/hostname", run / "grid.png")
    try:
        assert "grid.png" not in {p.name for p in R.run_files(run)}
    finally:
        (run / "grid.png").unlink()
        (app.output_dir / "linked").unlink()


def test_save_tab_summary_and_compvis_export(app, finished_run):
    job, _ = finished_run
    text, files = app.run_summary(job.run_name)
    assert "circle" in text and "xattn" in text
    path = app.export_compvis(job.run_name)
    assert path.name == "compvis.safetensors" and path in R.run_files(path.parent)


def test_evaluate_tab_runs_the_testbed_suite(app, finished_run):
    job, _ = finished_run
    rows, grids = app.evaluate(job.run_name, seeds=1, steps=3)
    metrics = {row[0]: row[1:] for row in rows}
    assert {"shape_accuracy", "erased_rate", "others_mean_accuracy", "accuracy: circle"} <= set(metrics)
    assert all(0 <= v <= 1 for row in rows for v in row[1:])
    assert all(os.path.isfile(p) for p, _ in grids)


def test_attack_tab_attacks_the_run_and_reports_both_rates(app, finished_run):
    job, _ = finished_run
    before = {n: p.detach().clone() for n, p in app.pipe.unet.named_parameters()}
    rows, images = app.attack(job.run_name, "unlearndiff", prompts=1, steps=2, num_images=1)
    metrics = dict(rows)
    assert {"asr_before", "asr_after", "asr_without_concept"} <= set(metrics)
    assert all(0 <= metrics[k] <= 1 for k in ("asr_before", "asr_after"))
    found = [what for what in metrics if "→" in what]
    prompt, attacked = found[0].split(" → ")  # the prompt, then the prompt the attack found: a prefix before it
    assert len(found) == 1 and "circle" in prompt and attacked.endswith(prompt) and attacked != prompt
    assert all(os.path.isfile(p) for p, _ in images)
    saved = json.loads((app.output_dir / job.run_name / "app-attack-unlearndiff" / "metrics.json").read_text())
    assert saved["n_prompts"] == 1 and saved["budget"]["steps"] == 2
    assert all(torch.equal(p, before[n]) for n, p in app.pipe.unet.named_parameters())  # the shared model is untouched
    for bad, words in (({"kind": "pgd"}, "unknown"), ({"prompts": 0}, "prompts must be"),
                       ({"steps": S.MAX_ATTACK_STEPS + 1}, "steps")):
        with pytest.raises(EsdError, match=words):
            app.attack(job.run_name, **{"kind": "unlearndiff", "prompts": 1, **bad})


def _handlers(demo) -> dict[tuple[str, str], object]:
    """{(elem_id of the component, event): the page's handler for it}, for the components that have an elem_id."""
    blocks = demo.blocks
    out = {}
    for fn in demo.fns.values():
        for block_id, event in fn.targets:
            elem_id = getattr(blocks.get(block_id), "elem_id", None)
            if elem_id:
                out[(elem_id, event)] = fn
    return out


def test_page_sends_the_form_as_erase_config_fields_and_runs_one_model_task_at_a_time(app):
    import gradio as gr


    demo = A.build_ui(app)
    handlers = _handlers(demo)
    # Start sends one input per form field, in the order its handler zips them with the field names,
    # each starting blank (the recipe decides) but for the concept and the opt-in boxes.
    names = F.FORM_FIELDS + F.ADVANCED_FIELDS
    start = handlers[("erase-start", "click")]
    assert [block.elem_id for block in start.inputs] == [f"cfg-{n.replace('_', '-')}" for n in names]
    initial = {name: default for name, _, default, *_ in app.form_fields(names)}
    for name, block in zip(names, start.inputs, strict=True):
        assert block.value in (initial[name], "" if initial[name] is None else initial[name]), name
    # Everything that uses the model shares one queue slot; Stop bypasses the queue so it reaches a running erase.
    model_tasks = [("erase-start", "click"), ("compare-button", "click"), ("evaluate-button", "click"),
                   ("attack-button", "click")]
    assert all(handlers[key].concurrency_id == "model" and handlers[key].concurrency_limit == 1 for key in model_tasks)
    export = [fn for fn in demo.fns.values() if fn.name == "wrapped" and fn.concurrency_id == "model"
              and [type(b).__name__ for b in fn.outputs] == ["Markdown", "File"]]
    assert len(export) == 1, "the CompVis export must queue with the other model tasks"
    stop = handlers[("erase-stop", "click")]
    assert stop.queue is False and stop.concurrency_limit is None
    # A user error in a handler is shown on the page (gr.Error), not raised as a stack trace.
    with pytest.raises(gr.Error, match="no erased model"):
        handlers[("compare-button", "click")].fn("", "a circle", 0, 5, 1)


def test_cli_binds_localhost_and_serves_only_the_output_folder(app, monkeypatch):
    import gradio as gr

    from esd.cli import build_parser

    args = build_parser().parse_args(["app"])
    assert (args.host, args.port, args.run) == ("127.0.0.1", 7860, A.run_app)
    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: seen.update(kwargs))
    A.launch(A.build_ui(app), app, args.host, args.port, block=False)
    assert seen["server_name"] == "127.0.0.1" and seen["allowed_paths"] == [str(app.output_dir)]
