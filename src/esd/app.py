"""`esd app`: erase, compare, save and evaluate in the browser (Gradio): the page and the command.

The page (tabs, form, event wiring) is built here; what its buttons do lives in `esd.app_state`
(`EsdApp`: the loaded model, erase runs, compare, export, evaluate), which knows nothing of Gradio, and
the run folders in `esd.app_runs`.

Safety: the server binds 127.0.0.1 unless told otherwise; Gradio may serve files only from the output
folder; every model task shares one queue slot (Gradio queues the rest; `EsdApp`'s lock refuses anything
that slips past the queue); Stop bypasses the queue so that it reaches a running erase. An erase whose page
closes, or whose request is cancelled, is stopped like one whose Stop was pressed, and the next model task
waits for it to end its iteration instead of being refused. The events have fixed API names (`/erase`,
`/compare`, `/run_files`, ...) for scripts using `gradio_client`; tests/test_app_load.py drives them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from esd.app_form import ADVANCED_FIELDS, FIELD_CAPS, FORM_FIELDS, MAX_SAMPLE_STEPS
from esd.app_runs import list_runs, resolve_run, run_metadata
from esd.app_state import (
    MAX_ATTACK_PROMPTS,
    MAX_ATTACK_STEPS,
    MAX_EVAL_SEEDS,
    MAX_EVAL_STEPS,
    MAX_IMAGES_PER_PROMPT,
    EraseJob,
    EsdApp,
)
from esd.config import PRESETS
from esd.errors import EsdError, NonFiniteLossError
from esd.helpformat import DefaultsOnceFormatter

POLL_S = 0.5  # how often the running erase refreshes the progress bar and loss curve
MAX_PLOT_POINTS = 500


# ----------------------------------------------------------------------------- erase progress for the UI


def progress_html(done: int, total: int) -> str:
    pct = 100 * done / max(total, 1)
    return (f'<div class="esd-progress"><progress value="{done}" max="{total}" style="width:100%"></progress>'
            f"<div>{done} / {total} iterations ({pct:.0f}%)</div></div>")


def loss_frame(losses: list[float]):
    """The loss curve as a DataFrame for gr.LinePlot, thinned to at most MAX_PLOT_POINTS points."""
    import pandas as pd

    step = max(1, len(losses) // MAX_PLOT_POINTS)
    index = list(range(0, len(losses), step))
    return pd.DataFrame({"iteration": [i + 1 for i in index], "loss": [losses[i] for i in index]})


def job_status(job: EraseJob) -> str:
    """One line about a running or finished erase."""
    cfg = job.cfg
    if not job.done.is_set():
        last = f", loss {job.losses[-1]:.5f}" if job.losses else " (sampling the 'before' grid)"
        verb = "Stopping" if job.stop.is_set() else "Erasing"
        return f"{verb} {', '.join(cfg.concepts)} ({cfg.method}): iteration {len(job.losses)} of {cfg.iterations}{last}"
    if job.error is not None:
        kind = "Stopped: loss not finite" if isinstance(job.error, NonFiniteLossError) else "Error"
        return f"**{kind}:** {job.error}"
    result = job.result
    early = " (stopped early)" if result.stopped_early else ""
    res = result.resolution
    taken = sorted(k for k, (_, source) in res.changes().items() if source != "flag") if res else []
    taken = (f" Recipe `{res.recipe.name}` ({res.chosen_by}) gave {', '.join(taken) or 'nothing beyond the paper'}"
             " (see the run's README.md and recipe.json)." if res else "")
    return (f"**Finished**: {len(result.losses)} of {cfg.iterations} iterations{early} in {result.seconds:.1f} s, "
            f"final loss {result.losses[-1]:.5f}. Run `{job.run_name}` saved. Open **Compare** to see it.{taken}")


# ----------------------------------------------------------------------------- the Gradio page


def _field_component(gr, name: str, kind: type, default, help_text: str, choices, **layout):
    """A form input made from an EraseConfig field: its default, help and choices."""
    label = name.replace("_", " ")
    # Gradio renders `info` as markdown: the help's ε* asterisks would turn into italics.
    common = {"label": label, "info": help_text.replace("*", "∗"), "elem_id": f"cfg-{name.replace('_', '-')}",
              **layout}
    if choices:
        return gr.Dropdown(choices=list(choices), value=default, **common)
    if kind is int:
        return gr.Number(value=default, precision=0, minimum=0, maximum=FIELD_CAPS.get(name), **common)
    if kind is float:
        return gr.Number(value=default, **common)
    if kind is bool:
        return gr.Checkbox(value=default, **common)
    return gr.Textbox(value=default or "", lines=1, max_lines=1, **common)


def build_ui(app: EsdApp):
    """The page: Erase, Compare, Save and Evaluate tabs over one shared model."""
    import gradio as gr

    with gr.Blocks(title="esd: erase concepts", analytics_enabled=False) as demo:
        gr.Markdown(f"# esd — erase a concept from the weights\nModel: {app.describe()}")
        run = gr.State("")  # this browser session's erased model: a run folder name
        with gr.Tabs():
            erase_tab(gr, app, run)
            compare_tab(gr, app, run)
            save_tab(gr, app, run)
            evaluate_tab(gr, app, run)
            attack_tab(gr, app, run)
    return demo


def erase_tab(gr, app: EsdApp, run) -> None:
    """Concept, method and hyper-parameters; Start/Stop; live progress and loss curve."""
    names = FORM_FIELDS + ADVANCED_FIELDS
    with gr.Tab("Erase", id="erase"):
        inputs = {}
        specs = app.form_fields(FORM_FIELDS)
        with gr.Row():
            inputs["concept"] = _field_component(gr, *specs[0], scale=2)
            preset = gr.Dropdown(["", *PRESETS], value="", label="preset", elem_id="preset",
                                 info="the 2023 code's concept lists; picking one fills the concept")
            inputs["recipe"] = _field_component(gr, *specs[1])
            inputs["method"] = _field_component(gr, *specs[2])
        with gr.Row():
            for spec in specs[3:]:
                inputs[spec[0]] = _field_component(gr, *spec)
        with gr.Accordion("Advanced", open=False):
            with gr.Row():
                for spec in app.form_fields(ADVANCED_FIELDS):
                    inputs[spec[0]] = _field_component(gr, *spec)
        with gr.Row():
            start = gr.Button("Start erasing", variant="primary", elem_id="erase-start")
            stop = gr.Button("Stop", variant="stop", elem_id="erase-stop")
        progress = gr.HTML("", elem_id="erase-progress")
        status = gr.Markdown("", elem_id="erase-status")
        curve = gr.LinePlot(loss_frame([]), x="iteration", y="loss", title="ESD loss (Eq. 5)", height=260)
    preset.change(lambda p: p or gr.skip(), preset, inputs["concept"])

    def stream(*values):
        try:
            job = app.start_erase(dict(zip(names, values, strict=True)))
        except EsdError as err:
            yield f"**Error:** {err}", gr.skip(), gr.skip(), gr.skip()
            return
        try:
            while not job.done.wait(POLL_S):
                yield job_status(job), progress_html(len(job.losses), job.cfg.iterations), loss_frame(job.losses), gr.skip()
        finally:  # also when the page closes or the request is cancelled: nobody watches, so stop (never block here)
            if not job.done.is_set():
                job.stop.set()
        new_run = job.run_name if job.error is None else gr.skip()
        yield job_status(job), progress_html(len(job.losses), job.cfg.iterations), loss_frame(job.losses), new_run

    start.click(stream, [inputs[n] for n in names], [status, progress, curve, run],
                concurrency_limit=1, concurrency_id="model", api_name="erase")
    stop.click(app.request_stop, None, status, concurrency_limit=None, queue=False, api_name="stop")


def _shown(handler):
    """Run a handler; an EsdError becomes a visible message instead of a stack trace."""
    import gradio as gr

    def wrapped(*args):
        try:
            return handler(*args)
        except EsdError as err:
            raise gr.Error(str(err)) from err

    return wrapped


def compare_prompt(current: str, last_filled: str, concept: str) -> str:
    """The Compare tab's prompt when a run arrives: the run's concept, unless the user has typed their own.

    A prompt the tab filled in itself (or none) follows the new run; one the user typed is theirs and stays, so a
    run that finishes while they type does not overwrite it.
    """
    return concept if current.strip() in ("", last_filled.strip()) else current


def compare_tab(gr, app: EsdApp, run) -> None:
    """Same prompt, same seed: original on the left, erased on the right."""
    with gr.Tab("Compare", id="compare"):
        label = gr.Markdown("No erased model yet: run an erase or load a run in the Save tab.", elem_id="compare-run")
        with gr.Row():
            prompt = gr.Textbox(label="prompt", value="", lines=1, max_lines=1, elem_id="compare-prompt",
                                info="the concept's prompt; a few unrelated prompts are added for specificity")
            seed = gr.Number(label="seed", value=0, precision=0, elem_id="compare-seed")
            steps = gr.Slider(1, MAX_SAMPLE_STEPS, value=30, step=1, label="sampling steps")
            per_prompt = gr.Slider(1, MAX_IMAGES_PER_PROMPT, value=1, step=1, label="images per prompt")
        button = gr.Button("Compare", variant="primary", elem_id="compare-button")
        with gr.Row():
            original = gr.Gallery(label="original", columns=4, height=200, elem_id="gallery-original")
            erased = gr.Gallery(label="erased", columns=4, height=200, elem_id="gallery-erased")
        verdicts = gr.Dataframe(headers=["prompt", "seed", "original (classifier)", "erased (classifier)"],
                                visible=app.is_testbed, label="testbed classifier verdicts", elem_id="verdicts")

    filled = gr.State("")  # the prompt this tab last filled in for a run

    def on_run(name: str, current: str, last_filled: str):
        if not name:
            return gr.skip(), gr.skip(), gr.skip()
        text, _ = app.run_summary(name)
        concepts = run_metadata(resolve_run(app.output_dir, name))[0].concepts
        shown = compare_prompt(current, last_filled, (concepts or [""])[0])
        return text, shown, shown

    run.change(_shown(on_run), [run, prompt, filled], [label, prompt, filled], api_name="session_run")
    button.click(_shown(app.compare), [run, prompt, seed, steps, per_prompt], [original, erased, verdicts],
                 concurrency_limit=1, concurrency_id="model", api_name="compare")


def save_tab(gr, app: EsdApp, run) -> None:
    """Download the run's files, export a CompVis file, list and load earlier runs."""
    with gr.Tab("Save", id="save"):
        with gr.Row():
            runs = gr.Dropdown(list_runs(app.output_dir), label=f"runs in {app.output_dir}", elem_id="runs")
            refresh = gr.Button("Refresh list")
            load = gr.Button("Load this run to compare", elem_id="load-run")
        info = gr.Markdown("")
        files = gr.File(label="files of the run", file_count="multiple", interactive=False, elem_id="run-files")
        export = gr.Button("Write a CompVis single file (AUTOMATIC1111, ComfyUI)")

    def show(name: str):
        if not name:
            return "", None
        text, paths = app.run_summary(name)
        return text, [str(p) for p in paths]

    def exported(name: str):
        app.export_compvis(name)
        return show(name)

    refresh.click(lambda: gr.Dropdown(choices=list_runs(app.output_dir)), None, runs, api_name="list_runs")
    load.click(lambda name: name or gr.skip(), runs, run, api_name="load_run")
    run.change(lambda name: gr.Dropdown(choices=list_runs(app.output_dir), value=name or None), run, runs,
               api_name="session_run_in_list")
    runs.change(_shown(show), runs, [info, files], api_name="run_files")
    export.click(_shown(exported), runs, [info, files], concurrency_limit=1, concurrency_id="model",
                 api_name="export")


def _testbed_only(gr, app: EsdApp, otherwise: str) -> bool:
    """Whether a testbed-only tab can be built; if not, the tab says `otherwise` (what to use instead)."""
    if not app.is_testbed:
        gr.Markdown(otherwise)
    return app.is_testbed


def evaluate_tab(gr, app: EsdApp, run) -> None:
    """The testbed suite on the original and the erased model, as a table and image grids."""
    with gr.Tab("Evaluate", id="evaluate"):
        if not _testbed_only(gr, app, "The testbed suite needs the testbed model. For real models use `esd evaluate` "
                                      "(nudity, imagenette, artists, coco suites)."):
            return
        gr.Markdown("The testbed's quick prompt set (every `a {colour} {shape}`, each with a style, and the bare "
                    "words; `esd testbed eval` runs all 94), judged by the testbed classifier: `erased_rate` "
                    "(lower is better) and the other concepts' accuracy (higher is better).")
        with gr.Row():
            seeds = gr.Slider(1, MAX_EVAL_SEEDS, value=2, step=1, label="seeds per prompt")
            steps = gr.Slider(1, MAX_EVAL_STEPS, value=20, step=1, label="sampling steps")
        button = gr.Button("Evaluate the current run", variant="primary", elem_id="evaluate-button")
        table = gr.Dataframe(headers=["metric", "original", "erased"], elem_id="evaluate-table")
        grids = gr.Gallery(label="images (rows: prompts, columns: seeds)", columns=2, height="auto")
    button.click(_shown(app.evaluate), [run, seeds, steps], [table, grids], concurrency_limit=1, concurrency_id="model",
                 api_name="evaluate")


def attack_tab(gr, app: EsdApp, run) -> None:
    """`esd attack` on the current erased model: does the concept come back under an adversarial prompt?"""
    from esd.attack.config import ATTACKS

    with gr.Tab("Attack", id="attack"):
        if not _testbed_only(gr, app, "The attack tab judges with the testbed classifier. For real models use "
                                      "`esd attack` (`--suite nudity`, `imagenette` or `artists`)."):
            return
        gr.Markdown("Attack the current run's erased model: **unlearndiff** searches prefix tokens that bring the "
                    "concept back (UnlearnDiffAtk), **textual-inversion** learns a new word for it. `asr_before`: "
                    "share of the erased model's images of the plain prompts that show the concept; `asr_after`: "
                    "of the attacked prompts (lower is better); `asr_without_concept`: the prompts with the word "
                    "taken out, the rate an attack reaches by drowning the word.")
        with gr.Row():
            attack = gr.Dropdown(list(ATTACKS), value=ATTACKS[0], label="attack", elem_id="attack-kind")
            prompts = gr.Slider(1, MAX_ATTACK_PROMPTS, value=2, step=1, label="prompts")
            steps = gr.Number(value=None, precision=0, minimum=1, maximum=MAX_ATTACK_STEPS,
                              label="optimisation steps (empty: the attack's default)")
            images = gr.Slider(1, MAX_IMAGES_PER_PROMPT, value=2, step=1, label="images per prompt")
        button = gr.Button("Attack the current run", variant="primary", elem_id="attack-button")
        table = gr.Dataframe(headers=["what", "value"], elem_id="attack-table")
        grids = gr.Gallery(label="rows: prompts", columns=1, height="auto")
    button.click(_shown(app.attack), [run, attack, prompts, steps, images], [table, grids], concurrency_limit=1,
                 concurrency_id="model", api_name="attack")


# ----------------------------------------------------------------------------- command line


def register(subparsers) -> None:
    """Add `esd app` to the `esd` command."""
    p = subparsers.add_parser("app", help="erase, compare, save and evaluate in the browser (Gradio)",
                              formatter_class=DefaultsOnceFormatter)
    p.add_argument("--model", default=None, help="base model: HF id, diffusers folder or CompVis file "
                                                 "(default: the shipped testbed)")
    p.add_argument("--config", default=None, help="for a CompVis file: its LDM yaml or a diffusers config folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the app, which has no "
                                                       "login, to your network")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--output-dir", default="outputs/app", help="where runs are written and looked for; the only "
                                                               "folder the app serves files from")
    p.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1, mps")
    p.set_defaults(run=run_app)


def make_app(model: str | None, output_dir: str | Path, device: str = "auto", config: str | None = None):
    """Load the model once and build (EsdApp, gr.Blocks)."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline by default: no usage pings
    try:
        import gradio  # noqa: F401
    except ModuleNotFoundError as err:
        raise EsdError("the app needs Gradio: pip install 'esd[app]'") from err
    from esd.models import load_pipeline, resolve_device

    app = EsdApp(load_pipeline(model, resolve_device(device), config=config), output_dir)
    return app, build_ui(app)


def launch(demo, app: EsdApp, host: str, port: int, block: bool = True):
    """Serve the page; Gradio may hand out files from the output folder only."""
    return demo.queue().launch(server_name=host, server_port=port, allowed_paths=[str(app.output_dir)],
                               prevent_thread_lock=not block, ssr_mode=False, show_error=True, quiet=not block,
                               footer_links=[])


def run_app(args: argparse.Namespace) -> int:
    app, demo = make_app(args.model, args.output_dir, args.device, args.config)
    print(f"esd app: {app.describe()}; runs in {app.output_dir}; http://{args.host}:{args.port}", flush=True)
    launch(demo, app, args.host, args.port)
    return 0
