"""The app's state and actions, free of Gradio: the loaded model, erase runs, compare, export, evaluate.

One base pipeline is loaded once and shared by every tab. An erase trains it in place in a worker
thread; afterwards the trained tensors are put back, so the pipeline always holds the *original*
weights, and the erased model is the base plus a run's `esd.safetensors`, applied only for the duration
of a call (`esd.weights.applied_weights`). That keeps one model in memory, not two.

Safety (the page's side is in `esd.app`): runs are addressed by folder *name* inside the output folder
(`esd.app_runs`), never by a path from the browser; iteration and image counts are capped; one model
task runs at a time (a lock refuses anything that slips past Gradio's queue, and waits for an erase that is
stopping).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from esd.app_form import MAX_SAMPLE_STEPS, check_caps, config_fields, given_from_form
from esd.app_runs import new_run_dir, resolve_run, run_files, run_metadata
from esd.config import EraseConfig
from esd.errors import EsdError
from esd.models import describe_model, grid_prompts
from esd.recipes import Resolution, available, resolve
from esd.weights import applied_weights, has_text_encoder_delta, restore_parameters, snapshot_parameters

# Sane maxima: a browser form must not be able to start a week-long job or a million images.
MAX_IMAGES_PER_PROMPT = 4
MAX_EVAL_SEEDS = 16
MAX_EVAL_STEPS = 50
MAX_ATTACK_PROMPTS = 12
MAX_ATTACK_STEPS = 400
STOP_GRACE_S = 1.0  # how long a model task waits for the model before it asks whether an erase is stopping
STOP_WAIT_S = 300  # and how long it then waits for that erase to end its current iteration

@dataclass
class EraseJob:
    """One erase running in a worker thread; the UI polls it."""

    cfg: EraseConfig  # as it runs: the recipe's settings with the form's filled fields over them
    resolution: Resolution  # the recipe and where each setting came from (the card and recipe.json say so)
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

    @property
    def folder(self) -> Path | None:
        """The model folder whose esd.json and recipes apply."""
        return Path(self.source) if self.source and Path(self.source).is_dir() else None

    def form_fields(self, names: tuple[str, ...]) -> list[tuple[str, type, object, str, list | None]]:
        """config_fields as the form shows them: blank (the recipe's value) but for the concept; recipe names."""
        out = []
        for name, kind, default, help_text, choices in config_fields(names):
            if name == "recipe":
                help_text = ("blank: the model folder's recipe for the concept's kind (or paper); the fields below "
                             "left blank take the recipe's values, filled ones win")
                choices = ["", *available(self.folder)]
            elif name != "concept" and kind is not bool:
                help_text += f" (blank: the recipe's; paper: {default})"
                choices = ["", *choices] if choices else None
            out.append((name, kind, None if name != "concept" and kind is not bool else default, help_text, choices))
        return out

    def run_dir(self, run_name: str) -> Path:
        """The folder of a run chosen in this session (by name, inside the output folder)."""
        if not run_name:
            raise EsdError("no erased model yet: run an erase, or load a run in the Save tab")
        return resolve_run(self.output_dir, run_name)

    def describe(self) -> str:
        return f"{describe_model(self.pipe)} — `{self.source}`"

    def _take_model(self) -> bool:
        """Take the model lock. Gradio's queue runs one model task at a time, so the lock is only ever held here by
        an erase that is stopping (Stop pressed, or its page closed, which the next task can beat by a moment) or
        by a call that bypassed the queue. Wait for the first to end its iteration; refuse the second."""
        if self.lock.acquire(timeout=STOP_GRACE_S):
            return True
        job = self.job
        return job is not None and job.stop.is_set() and self.lock.acquire(timeout=STOP_WAIT_S)

    @contextlib.contextmanager
    def model_busy(self) -> Iterator[None]:
        if not self._take_model():
            raise EsdError("the model is busy (an erase or another task is running); wait for it or press Stop")
        try:
            yield
        finally:
            self.lock.release()

    # ---- erase

    def start_erase(self, values: dict) -> EraseJob:
        """Resolve the form as `esd erase` resolves flags (recipe, then filled fields) and start erasing in a worker
        thread; refused while another task runs."""
        given = given_from_form(values, self.output_dir, str(self.device))
        if given.get("recipe") and given["recipe"] not in available(self.folder):
            raise EsdError(f"recipe {given['recipe']!r} is unknown; pick one of the list")  # names only, no paths
        resolution = resolve(given, self.folder)
        cfg = check_caps(resolution.config)
        if not self._take_model():
            raise EsdError("an erase is already running; wait for it to finish or press Stop")
        cfg.output = str(new_run_dir(self.output_dir, cfg))  # made holding the lock: never collides
        job = EraseJob(cfg, resolution)
        self.job = job
        threading.Thread(target=self._erase_worker, args=(job,), name="esd-erase", daemon=True).start()
        return job

    def _erase_worker(self, job: EraseJob) -> None:
        """Train, then put the base weights back: the run's file holds the erased ones."""
        from esd.erase import erase
        from esd.selection import trainable_names

        unet, encoder = self.pipe.unet, self.pipe.text_encoder
        try:
            saved = [(unet, snapshot_parameters(unet, trainable_names(unet, job.cfg.method)))]
            if job.cfg.train_text_encoder:
                saved.append((encoder, snapshot_parameters(encoder, [n for n, _ in encoder.named_parameters()])))
            try:
                job.result = erase(job.cfg, pipe=self.pipe, progress=False, on_step=job.on_step,
                                   resolution=job.resolution)
            finally:
                for module, values in saved:
                    restore_parameters(module, values)
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
        def words(text: str) -> set[str]:  # punctuation is not part of a word: "circle," names circle
            return set(re.findall(r"[a-z0-9]+", text.lower()))

        named = {w for c in concepts for w in words(c) if len(w) > 2}  # not "a", "of"
        return [p for p in prompts if not named & words(p)][:3]

    def compare(self, run_name: str, prompt: str, seed: int, steps: int = 30,
                per_prompt: int = 1) -> tuple[list, list, list[list]]:
        """Original and erased images (same seeds) for `prompt` and unrelated prompts, with testbed verdicts.

        Returns (original [(image, caption)], erased [(image, caption)], verdict rows).
        """
        from esd.evaluate.generate import DEFAULT_GUIDANCE, generate_product

        steps, per_prompt, seed = int(steps), int(per_prompt), int(seed)
        if not 1 <= steps <= MAX_SAMPLE_STEPS or not 1 <= per_prompt <= MAX_IMAGES_PER_PROMPT:
            raise EsdError(f"steps must be 1..{MAX_SAMPLE_STEPS} and images per prompt 1..{MAX_IMAGES_PER_PROMPT}")
        if not prompt.strip():
            raise EsdError("the prompt is empty")
        run = self.run_dir(run_name)
        concepts = run_metadata(run)[0].concepts
        prompts = [prompt.strip(), *self.unrelated_prompts(concepts)]
        seeds = [seed + k for k in range(per_prompt)]
        jobs = [(p, s) for p in prompts for s in seeds]  # the order generate_product makes them in
        with self.model_busy():
            original = generate_product(self.pipe, prompts, seeds, steps, DEFAULT_GUIDANCE)
            with applied_weights(self.pipe, run / "esd.safetensors"):
                erased = generate_product(self.pipe, prompts, seeds, steps, DEFAULT_GUIDANCE)
        verdicts = self.verdicts(jobs, original, erased)
        captions = [f"{p} · seed {s}" for p, s in jobs]
        return list(zip(original, captions, strict=True)), list(zip(erased, captions, strict=True)), verdicts

    def verdicts(self, jobs: list[tuple[str, int]], original: list[Image.Image],
                 erased: list[Image.Image]) -> list[list]:
        """Testbed only: the classifier's shape/colour/style for each image, original vs erased."""
        if not self.is_testbed:
            return []
        if self._classifier is None:
            from esd.testbed.classifier import load_classifier

            self._classifier = load_classifier(Path(self.source) / "classifier")
        before, after = self._classifier.classify(original), self._classifier.classify(erased)
        return [[p, s, label(b), label(a)] for (p, s), b, a in zip(jobs, before, after, strict=True)]

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
        weights = run / "esd.safetensors"
        with self.model_busy(), applied_weights(self.pipe, weights):
            return export_pipeline(self.pipe, run / "compvis.safetensors", base_file=base if base.is_file() else None,
                                   text_encoder=has_text_encoder_delta(weights))

    # ---- evaluate

    def evaluate(self, run_name: str, seeds: int = 2, steps: int = 20) -> tuple[list[list], list]:
        """The testbed's quick prompt set (34 prompts, `seeds` seeds each) for the original and the erased model."""
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
            original = evaluate_testbed(self.pipe, out / "original", erased, seeds, steps, classifier_path=classifier,
                                        prompt_set="quick")
            with applied_weights(self.pipe, run / "esd.safetensors"):
                after = evaluate_testbed(self.pipe, out / "erased", erased, seeds, steps, classifier_path=classifier,
                                         prompt_set="quick")
        return evaluation_rows(original, after), [(str(out / "original" / "grid.png"), "original"),
                                                  (str(out / "erased" / "grid.png"), "erased")]

    def attack(self, run_name: str, kind: str, prompts: int = 2, steps: int | None = None,
               num_images: int = 2) -> tuple[list[list], list]:
        """`esd attack` on the run's erased model (the testbed judge): [[what, value]] rows and the images
        (the original model's targets, the erased model's images of the plain and of the attacked prompts)."""
        from esd.attack.command import attack as run_attack
        from esd.attack.config import ATTACKS, DEFAULT_BUDGET, AttackConfig
        from esd.testbed.evaluate import check_concept

        if not self.is_testbed:
            raise EsdError("the attack tab judges with the testbed classifier: it needs the testbed model (esd app "
                           "without --model); for real models use `esd attack --suite nudity|imagenette|artists`")
        if kind not in ATTACKS:
            raise EsdError(f"attack {kind!r} is unknown; choose one of {', '.join(ATTACKS)}")
        prompts, num_images = int(prompts), int(num_images)
        steps = DEFAULT_BUDGET[kind]["steps"] if steps in (None, "") else int(steps)
        if not (1 <= prompts <= MAX_ATTACK_PROMPTS and 1 <= steps <= MAX_ATTACK_STEPS
                and 1 <= num_images <= MAX_IMAGES_PER_PROMPT):
            raise EsdError(f"prompts must be 1..{MAX_ATTACK_PROMPTS}, steps 1..{MAX_ATTACK_STEPS} and images per "
                           f"prompt 1..{MAX_IMAGES_PER_PROMPT}")
        run = self.run_dir(run_name)
        concept = check_concept(run_metadata(run)[0].concept)  # a word the judge sees, or a clear error
        out = run / f"app-attack-{kind}"
        cfg = AttackConfig(attack=kind, concept=concept, weights=str(run / "esd.safetensors"), model=str(self.source),
                           output=str(out), prompts=prompts, steps=steps, num_images=num_images,
                           device=str(self.device), overwrite=True)
        with self.model_busy():  # its own copy of the small testbed: the attack adds tokens and applies the run
            run_attack(cfg)
        return attack_rows(json.loads((out / "metrics.json").read_text())), [
            (str(out / "side_by_side.png"), "per prompt: original model's targets | erased: plain prompt | "
                                            "erased: attacked prompt")]


def attack_rows(metrics: dict) -> list[list]:
    """[what, value] rows of an attack's metrics.json: the rates, then each prompt and what the attack found."""
    rows = [[k, round(metrics[k], 3)] for k in ("asr_before", "asr_after", "asr_without_concept") if k in metrics]
    rows += [[f"{r['prompt']} → {r['found_prompt']}", f"{r['asr_before']:.2f} → {r['asr_after']:.2f}"]
             for r in metrics["per_prompt"]]
    return rows


def label(p) -> str:
    """A testbed verdict as words: "red circle", "red circle, striped" (solid is not named)."""
    return f"{p.colour} {p.shape}" + (f", {p.style}" if p.style not in ("solid", "none") else "")


def evaluation_rows(original: dict, erased: dict) -> list[list]:
    """[metric, original, erased] rows: the summary, then accuracy per concept."""
    keys = ["shape_accuracy", "colour_accuracy", "style_accuracy", "erased_rate", "others_mean_accuracy",
            "others_min_accuracy"]
    rows = [[k, round(original[k], 3), round(erased[k], 3)] for k in keys if k in original]
    rows += [[f"accuracy: {c}", round(v, 3), round(erased["per_concept"][c], 3)]
             for c, v in original["per_concept"].items()]
    return rows
