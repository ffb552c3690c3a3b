"""`esd app`: erase, compare, save and evaluate in the browser (Gradio).

One base pipeline is loaded once and shared by every tab. An erase trains it in place in a worker
thread; afterwards the trained tensors are put back, so the pipeline always holds the *original*
weights, and the erased model is the base plus a run's `esd.safetensors`, applied only for the duration
of a call (`applied_weights`). That keeps one model in memory, not two.

Safety: the server binds 127.0.0.1 unless told otherwise; Gradio may serve files only from the output
folder; runs are addressed by folder *name* inside it, never by a path from the browser; iteration and
image counts are capped; one model task runs at a time (Gradio queues the rest, and a lock refuses
anything that slips past the queue).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import threading
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from esd.config import PRESETS, EraseConfig
from esd.errors import EsdError, NonFiniteLossError
from esd.models import describe_model, grid_prompts, model_notes
from esd.weights import apply_esd_weights

# Sane maxima: a browser form must not be able to start a week-long job or a million images.
MAX_ITERATIONS = 5000
MAX_DDIM_STEPS = 200
MAX_SAMPLE_STEPS = 100
MAX_IMAGES_PER_PROMPT = 4
MAX_EVAL_SEEDS = 16
MAX_EVAL_STEPS = 50
POLL_S = 0.5  # how often the running erase refreshes the progress bar and loss curve
MAX_PLOT_POINTS = 500

# EraseConfig fields shown in the form (the rest keep their EraseConfig defaults).
FORM_FIELDS = ("concept", "method", "iterations", "eta", "start_guidance", "lr", "seed")
ADVANCED_FIELDS = ("ddim_steps", "sample_from", "separator", "erase_from", "grid_steps", "save_every")
FIELD_CAPS = {"iterations": MAX_ITERATIONS, "ddim_steps": MAX_DDIM_STEPS, "grid_steps": MAX_SAMPLE_STEPS,
              "save_every": MAX_ITERATIONS}
RUN_FILES = ("esd.safetensors", "README.md", "compvis.safetensors", "loss.png", "grid.png")


# ----------------------------------------------------------------------------- settings from EraseConfig


def config_fields(names: tuple[str, ...]) -> list[tuple[str, type, object, str, list | None]]:
    """(name, type, default, help, choices) of EraseConfig fields: the form is built from these."""
    hints = typing.get_type_hints(EraseConfig)
    by_name = {f.name: f for f in dataclasses.fields(EraseConfig)}
    out = []
    for name in names:
        f = by_name[name]
        kind = hints[name]
        if typing.get_origin(kind) is not None and typing.get_origin(kind) is not typing.Literal:  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        choices = f.metadata.get("choices")
        out.append((name, str if choices else kind, f.default, f.metadata.get("help", ""), choices))
    return out


def _coerce(name: str, kind: type, value):
    """A form value as the field's type; empty text means None (optional fields)."""
    if kind is str:
        text = "" if value is None else str(value)
        return text if name == "concept" or text.strip() else None
    if value is None or value == "":
        raise EsdError(f"{name.replace('_', ' ')} is empty")
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise EsdError(f"{name.replace('_', ' ')} must be a number, got {value!r}") from err
    if kind is int:
        if not number.is_integer():
            raise EsdError(f"{name.replace('_', ' ')} must be a whole number, got {value}")
        return int(number)
    return number


def config_from_form(values: dict, output: Path, device: str) -> EraseConfig:
    """Validate the form through EraseConfig (one place for the rules) plus the app's caps."""
    kinds = {name: kind for name, kind, *_ in config_fields(FORM_FIELDS + ADVANCED_FIELDS)}
    unknown = set(values) - set(kinds)
    if unknown:
        raise EsdError(f"not settable from the app: {', '.join(sorted(unknown))}")
    cfg = EraseConfig(**{k: _coerce(k, kinds[k], v) for k, v in values.items()}, output=str(output),
                      device=device)
    cfg.validate()
    for name, cap in FIELD_CAPS.items():
        if getattr(cfg, name) > cap:
            raise EsdError(f"{name.replace('_', ' ')} is {getattr(cfg, name)}; the app allows at most {cap} "
                           "(use `esd erase` for longer runs)")
    return cfg


# ----------------------------------------------------------------------------- weights in and out of the UNet


def snapshot(unet: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """CPU copies of the named parameters, to put back later."""
    return {name: unet.get_parameter(name).detach().to("cpu", copy=True) for name in names}


@torch.no_grad()
def restore(unet: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put saved values back and drop gradients left by training."""
    for name, value in saved.items():
        param = unet.get_parameter(name)
        param.copy_(value.to(param.device, param.dtype))
        param.grad = None


@contextlib.contextmanager
def applied_weights(unet: torch.nn.Module, path: Path) -> Iterator[dict[str, str]]:
    """The UNet with an ESD weights file applied inside the block, and its own values again after it."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # names only; apply_esd_weights reads and checks the tensors
        names = list(f.keys())
    own = dict(unet.named_parameters())
    saved = snapshot(unet, [n for n in names if n in own])  # unknown names are refused by apply below
    try:
        yield apply_esd_weights(unet, path)
    finally:
        restore(unet, saved)


# ----------------------------------------------------------------------------- runs in the output folder


def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")[:40] or "concept"


def resolve_run(output_dir: Path, name: str) -> Path:
    """The run folder called `name` directly inside `output_dir`; anything else (paths, links out) is refused."""
    root = output_dir.resolve()
    if not name or name != Path(name).name or name in (".", ".."):
        raise EsdError(f"{name!r} is not a run name in {root}")
    run = (root / name).resolve()
    if run.parent != root or not (run / "esd.safetensors").is_file():
        raise EsdError(f"no run {name!r} in {root}")
    return run


def run_files(run: Path) -> list[Path]:
    """The run's downloadable files: known names only, real files inside the run folder (no links out)."""
    files = [run / n for n in RUN_FILES]
    return [p for p in files if p.is_file() and not p.is_symlink() and p.resolve().parent == run.resolve()]


def list_runs(output_dir: Path) -> list[str]:
    """Run folder names (those holding esd.safetensors), newest first."""
    if not output_dir.is_dir():
        return []
    runs = [p for p in output_dir.iterdir()
            if p.is_dir() and not p.is_symlink() and (p / "esd.safetensors").is_file()]
    return [p.name for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]


def run_metadata(run: Path) -> tuple[EraseConfig, dict[str, str]]:
    """A run's EraseConfig and weights metadata, read from the safetensors header only (no tensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(run / "esd.safetensors"), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # a damaged file: say which run
        raise EsdError(f"run {run.name}: esd.safetensors is not readable ({err})") from err
    return EraseConfig.from_json(meta.get("esd_config", "{}")), meta


def new_run_dir(output_dir: Path, cfg: EraseConfig) -> Path:
    """Create and return outputs/app/<concept>-<method>-<time>, never an existing folder."""
    stem = f"{slug(cfg.concept)}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = output_dir / stem, 1
    while path.exists():
        n += 1
        path = output_dir / f"{stem}-{n}"
    path.mkdir(parents=True)
    return path


# ----------------------------------------------------------------------------- the erase job


@dataclass
class EraseJob:
    """One erase running in a worker thread; the UI polls it."""

    cfg: EraseConfig
    losses: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    result: object | None = None  # esd.erase.EraseResult
    error: BaseException | None = None

    def on_step(self, i: int, loss: float) -> bool:
        """erase()'s callback: record the loss; True (stop pressed) ends training, keeping what was done."""
        self.losses.append(loss)
        return self.stop.is_set()

    @property
    def run_name(self) -> str:
        return Path(self.cfg.output).name


class EsdApp:
    """The app's state and handlers, free of Gradio so that tests can call them directly."""

    def __init__(self, pipe, output_dir: str | Path):
        self.pipe = pipe
        self.output_dir = Path(output_dir).resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()  # one model task at a time: erase, compare, export, evaluate
        self.job: EraseJob | None = None
        self._classifier = None

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def source(self) -> str:
        return str(getattr(self.pipe, "esd_source", "") or "")

    @property
    def is_testbed(self) -> bool:
        """A testbed-like model: its folder ships the shape/colour classifier."""
        return (Path(self.source) / "classifier" / "config.json").is_file()

    def form_fields(self, names: tuple[str, ...]) -> list[tuple[str, type, object, str, list | None]]:
        """config_fields with the model folder's recommended settings (its esd.json) as the initial values."""
        recommended = model_notes(self.pipe).get("erase_defaults", {})
        out = []
        for name, kind, default, help_text, choices in config_fields(names):
            if name in recommended and recommended[name] != default:
                help_text += f" [this model recommends {recommended[name]}; EraseConfig default {default}]"
                default = recommended[name]
            out.append((name, kind, default, help_text, choices))
        return out

    def run_dir(self, run_name: str) -> Path:
        """The folder of a run chosen in this session (by name, inside the output folder)."""
        if not run_name:
            raise EsdError("no erased model yet: run an erase, or load a run in the Save tab")
        return resolve_run(self.output_dir, run_name)

    def describe(self) -> str:
        return f"{describe_model(self.pipe)} — `{self.source}`"

    @contextlib.contextmanager
    def model_busy(self) -> Iterator[None]:
        if not self.lock.acquire(blocking=False):
            raise EsdError("the model is busy (an erase or another task is running); wait for it or press Stop")
        try:
            yield
        finally:
            self.lock.release()

    # ---- erase

    def start_erase(self, values: dict) -> EraseJob:
        """Validate the form and start erasing in a worker thread; refused while another task runs."""
        cfg = config_from_form(values, self.output_dir, str(self.device))
        if not self.lock.acquire(blocking=False):
            raise EsdError("an erase is already running; wait for it to finish or press Stop")
        cfg.output = str(new_run_dir(self.output_dir, cfg))  # made while holding the lock: names never collide
        job = EraseJob(cfg)
        self.job = job
        threading.Thread(target=self._erase_worker, args=(job,), name="esd-erase", daemon=True).start()
        return job

    def _erase_worker(self, job: EraseJob) -> None:
        """Train, then put the base weights back: the run's file holds the erased ones."""
        from esd.erase import erase
        from esd.params import trainable_names

        unet = self.pipe.unet
        try:
            saved = snapshot(unet, trainable_names(unet, job.cfg.method))
            try:
                job.result = erase(job.cfg, pipe=self.pipe, progress=False, on_step=job.on_step)
            finally:
                restore(unet, saved)
        except Exception as err:  # shown in the UI; the worker must never die silently
            job.error = err
        finally:
            self.lock.release()
            job.done.set()

    def request_stop(self) -> str:
        job = self.job
        if job is None or job.done.is_set():
            return "No erase is running."
        job.stop.set()
        return "Stopping after the current iteration; what was trained so far is saved."

    # ---- compare

    def unrelated_prompts(self, concepts: list[str]) -> list[str]:
        """Up to three of the model's grid prompts (its esd.json, or generic ones) that do not name the concept."""
        prompts = grid_prompts(self.pipe)
        words = {w for c in concepts for w in c.lower().split() if len(w) > 2}  # not "a", "of"
        return [p for p in prompts if not words & set(p.lower().split())][:3]

    def compare(self, run_name: str, prompt: str, seed: int, steps: int = 30,
                per_prompt: int = 1) -> tuple[list, list, list[list]]:
        """Original and erased images (same seeds) for `prompt` and unrelated prompts, with testbed verdicts.

        Returns (original [(image, caption)], erased [(image, caption)], verdict rows).
        """
        from esd.evaluate.generate import DEFAULT_GUIDANCE, generate

        steps, per_prompt, seed = int(steps), int(per_prompt), int(seed)
        if not 1 <= steps <= MAX_SAMPLE_STEPS or not 1 <= per_prompt <= MAX_IMAGES_PER_PROMPT:
            raise EsdError(f"steps must be 1..{MAX_SAMPLE_STEPS} and images per prompt 1..{MAX_IMAGES_PER_PROMPT}")
        if not prompt.strip():
            raise EsdError("the prompt is empty")
        run = self.run_dir(run_name)
        concepts = run_metadata(run)[0].concepts
        prompts = [prompt.strip(), *self.unrelated_prompts(concepts)]
        jobs = [(p, seed + k) for p in prompts for k in range(per_prompt)]
        with self.model_busy():
            original = generate(self.pipe, [p for p, _ in jobs], [s for _, s in jobs], steps, DEFAULT_GUIDANCE)
            with applied_weights(self.pipe.unet, run / "esd.safetensors"):
                erased = generate(self.pipe, [p for p, _ in jobs], [s for _, s in jobs], steps, DEFAULT_GUIDANCE)
        verdicts = self.verdicts(jobs, original, erased)
        captions = [f"{p} · seed {s}" for p, s in jobs]
        return list(zip(original, captions, strict=True)), list(zip(erased, captions, strict=True)), verdicts

    def verdicts(self, jobs: list[tuple[str, int]], original: list[Image.Image],
                 erased: list[Image.Image]) -> list[list]:
        """Testbed only: the classifier's shape/colour for each image, original vs erased."""
        if not self.is_testbed:
            return []
        if self._classifier is None:
            from esd.testbed.classifier import load_classifier

            self._classifier = load_classifier(Path(self.source) / "classifier")
        before, after = self._classifier.classify(original), self._classifier.classify(erased)
        return [[p, s, f"{b.colour} {b.shape}", f"{a.colour} {a.shape}"]
                for (p, s), b, a in zip(jobs, before, after, strict=True)]

    # ---- save

    def run_summary(self, run_name: str) -> tuple[str, list[Path]]:
        """A markdown summary of a run and its downloadable files."""
        run = self.run_dir(run_name)
        cfg, meta = run_metadata(run)
        lines = [f"**{run.name}**: `{cfg.concept}` erased with `{cfg.method}`, {meta.get('step', '?')} of "
                 f"{cfg.iterations} iterations, η {cfg.eta}, lr {cfg.lr}, seed {cfg.seed}",
                 f"base model: `{meta.get('base_model', '?')}`"]
        if meta.get("base_model") and meta["base_model"] != self.source:
            lines.append(f"⚠ made from another base model than the one loaded (`{self.source}`)")
        return "\n\n".join(lines), run_files(run)

    def export_compvis(self, run_name: str) -> Path:
        """Write the run's erased model as one CompVis file (for AUTOMATIC1111/ComfyUI) beside its weights."""
        from esd.compvis import export_pipeline

        run = self.run_dir(run_name)
        base = Path(self.source)
        with self.model_busy(), applied_weights(self.pipe.unet, run / "esd.safetensors"):
            return export_pipeline(self.pipe, run / "compvis.safetensors", base_file=base if base.is_file() else None)

    # ---- evaluate

    def evaluate(self, run_name: str, seeds: int = 2, steps: int = 20) -> tuple[list[list], list]:
        """The testbed suite (every colour x shape, `seeds` seeds each) for the original and the erased model."""
        from esd.testbed.evaluate import check_concept, evaluate_testbed

        seeds, steps = int(seeds), int(steps)
        if not self.is_testbed:
            raise EsdError("the testbed suite needs the testbed model (esd app without --model); "
                           "for real models use `esd evaluate`")
        if not 1 <= seeds <= MAX_EVAL_SEEDS or not 1 <= steps <= MAX_EVAL_STEPS:
            raise EsdError(f"seeds must be 1..{MAX_EVAL_SEEDS} and steps 1..{MAX_EVAL_STEPS}")
        run = self.run_dir(run_name)
        concept = run_metadata(run)[0].concept
        try:
            erased = check_concept(concept)
        except EsdError:
            erased = None  # not a testbed word: report accuracies only
        out, classifier = run / "app-eval", Path(self.source) / "classifier"
        with self.model_busy():
            original = evaluate_testbed(self.pipe, out / "original", erased, seeds, steps, classifier_path=classifier)
            with applied_weights(self.pipe.unet, run / "esd.safetensors"):
                after = evaluate_testbed(self.pipe, out / "erased", erased, seeds, steps, classifier_path=classifier)
        return evaluation_rows(original, after), [(str(out / "original" / "grid.png"), "original"),
                                                  (str(out / "erased" / "grid.png"), "erased")]


def evaluation_rows(original: dict, erased: dict) -> list[list]:
    """[metric, original, erased] rows: the summary, then accuracy per concept."""
    keys = ["shape_accuracy", "colour_accuracy", "erased_rate", "others_mean_accuracy"]
    rows = [[k, round(original[k], 3), round(erased[k], 3)] for k in keys if k in original]
    rows += [[f"accuracy: {c}", round(v, 3), round(erased["per_concept"][c], 3)]
             for c, v in original["per_concept"].items()]
    return rows


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
    return (f"**Finished**: {len(result.losses)} of {cfg.iterations} iterations{early} in {result.seconds:.1f} s, "
            f"final loss {result.losses[-1]:.5f}. Run `{job.run_name}` saved. Open **Compare** to see it.")


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
            inputs["method"] = _field_component(gr, *specs[1])
        with gr.Row():
            for spec in specs[2:]:
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
        while not job.done.wait(POLL_S):
            yield job_status(job), progress_html(len(job.losses), job.cfg.iterations), loss_frame(job.losses), gr.skip()
        new_run = job.run_name if job.error is None else gr.skip()
        yield job_status(job), progress_html(len(job.losses), job.cfg.iterations), loss_frame(job.losses), new_run

    start.click(stream, [inputs[n] for n in names], [status, progress, curve, run],
                concurrency_limit=1, concurrency_id="model")
    stop.click(app.request_stop, None, status, concurrency_limit=None, queue=False)


def _shown(handler):
    """Run a handler; an EsdError becomes a visible message instead of a stack trace."""
    import gradio as gr

    def wrapped(*args):
        try:
            return handler(*args)
        except EsdError as err:
            raise gr.Error(str(err)) from err

    return wrapped


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

    def on_run(name: str):
        if not name:
            return gr.skip(), gr.skip()
        text, _ = app.run_summary(name)
        concepts = run_metadata(resolve_run(app.output_dir, name))[0].concepts
        return text, (concepts or [""])[0]

    run.change(on_run, run, [label, prompt])
    button.click(_shown(app.compare), [run, prompt, seed, steps, per_prompt], [original, erased, verdicts],
                 concurrency_limit=1, concurrency_id="model")


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

    refresh.click(lambda: gr.Dropdown(choices=list_runs(app.output_dir)), None, runs)
    load.click(lambda name: name or gr.skip(), runs, run)
    run.change(lambda name: gr.Dropdown(choices=list_runs(app.output_dir), value=name or None), run, runs)
    runs.change(_shown(show), runs, [info, files])
    export.click(_shown(exported), runs, [info, files], concurrency_limit=1, concurrency_id="model")


def evaluate_tab(gr, app: EsdApp, run) -> None:
    """The testbed suite on the original and the erased model, as a table and image grids."""
    with gr.Tab("Evaluate", id="evaluate"):
        if not app.is_testbed:
            gr.Markdown("The testbed suite needs the testbed model. For real models use `esd evaluate` "
                        "(nudity, imagenette, artists, coco suites).")
            return
        gr.Markdown("Every `a {colour} {shape}` prompt, judged by the testbed classifier: `erased_rate` "
                    "(lower is better) and the other concepts' accuracy (higher is better).")
        with gr.Row():
            seeds = gr.Slider(1, MAX_EVAL_SEEDS, value=2, step=1, label="seeds per prompt")
            steps = gr.Slider(1, MAX_EVAL_STEPS, value=20, step=1, label="sampling steps")
        button = gr.Button("Evaluate the current run", variant="primary", elem_id="evaluate-button")
        table = gr.Dataframe(headers=["metric", "original", "erased"], elem_id="evaluate-table")
        grids = gr.Gallery(label="images (rows: prompts, columns: seeds)", columns=2, height="auto")
    button.click(_shown(app.evaluate), [run, seeds, steps], [table, grids], concurrency_limit=1, concurrency_id="model")


# ----------------------------------------------------------------------------- command line


def register(subparsers) -> None:
    """Add `esd app` to the `esd` command."""
    p = subparsers.add_parser("app", help="erase, compare, save and evaluate in the browser (Gradio)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="base model: HF id, diffusers folder or CompVis file "
                                                 "(none: the shipped testbed)")
    p.add_argument("--config", default=None, help="for a CompVis file: its LDM yaml or a diffusers config folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the app, which has no "
                                                       "login, to your network")
    p.add_argument("--port", type=int, default=7860)
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
