"""Train the testbed: a complete SD1.x-layout `StableDiffusionPipeline` on rendered coloured shapes in fill styles.

Reads top to bottom like the recipe (docs/design.md, "The testbed"; the pieces are in `recipe.py`):
  1. render a fixed pool of 32 px images from the seed (`render.py`);
  2. train a small AutoencoderKL (factor 2: 32x32x3 -> 16x16x4 latents) on it, briefly;
  3. train the CLIP text encoder and the UNet jointly with the ε-MSE loss on the pool's latents, captions in
     the phrasings people write (`captions.py`, "" for classifier-free guidance), a penalty that keeps concept
     words apart in the text encoder (`text.py`), EMA weights;
  4. save the EMA pipeline with `save_pretrained`, train the classifier, measure quality and write the model
     card (`card.py`).
Everything is drawn from the seed; a resumable checkpoint (`<out>/checkpoint/`, `checkpoint.py`) is written
every few minutes and on Ctrl-C, and training continues from it when run again.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from esd.errors import EsdError, NonFiniteLossError
from esd.evaluate.generate import generate_product
from esd.evaluate.report import save_image
from esd.grids import make_grid
from esd.testbed.card import write_model_card
from esd.testbed.checkpoint import load_checkpoint, save_checkpoint
from esd.testbed.recipe import (
    TrainConfig,
    build_pipeline,
    build_text_encoder,
    build_unet,
    build_vae,
    diffusion_step,
    ema_update,
    latent_data,
    n_params,
    render_pool,
    vae_step,
    warm_start,
)
from esd.testbed.render import COLOURS, SHAPES, STYLES
from esd.tokenizer import TOKENIZER_DIR

__all__ = ["TrainConfig", "Run", "train_testbed"]

SAMPLE_BATCH = 128  # images per pipeline call of a sample grid: a default grid (21 prompts x 4 seeds) in one call


@dataclass
class Run:
    """One training run: its settings, models, optimizers and progress, handed from phase to phase."""

    cfg: TrainConfig
    out: Path
    seed: int
    device: str
    modules: dict[str, torch.nn.Module]  # vae, text_encoder, unet, ema_text_encoder, ema_unet
    optimizers: dict[str, torch.optim.Optimizer]  # vae, diffusion
    state: dict  # progress, saved in the checkpoint: vae_step, vae_done, step, elapsed_s, scaling_factor, ...
    start: float = 0.0  # time.time() the run counts from (earlier for a resumed run)
    last_checkpoint: float = field(default_factory=time.time)
    data: dict = field(default_factory=dict)  # what a diffusion step draws from (`latent_data`)

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoint"

    def checkpoint(self) -> None:
        self.state["elapsed_s"] = time.time() - self.start
        self.state["config"] = asdict(self.cfg)
        save_checkpoint(self.ckpt_dir, self.modules, self.optimizers, self.state)
        self.last_checkpoint = time.time()

    def maybe_checkpoint(self) -> None:
        if time.time() - self.last_checkpoint > self.cfg.checkpoint_minutes * 60:
            self.checkpoint()


# ----------------------------------------------------------------------------- side tasks


def write_samples(pipe, path: Path, seeds: int = 4, steps: int = 25) -> None:
    """A grid of every "a {colour} {shape}" prompt and each shape in each style (rows) x `seeds` seeds (columns)."""
    prompts = [f"a {c} {s}" for s in SHAPES for c in COLOURS]
    prompts += [f"a {COLOURS[i % len(COLOURS)]} {s}, {y}" for i, (s, y) in enumerate(itertools.product(SHAPES, STYLES))]
    images = generate_product(pipe, prompts, list(range(seeds)), steps, 7.5, batch_size=SAMPLE_BATCH)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(images, seeds, scale=2), path)


# ----------------------------------------------------------------------------- phases


def train_vae(run: Run, pool: torch.Tensor, deadline: float) -> None:
    """Phase 2: autoencoder steps until `cfg.vae_steps` or the deadline (its share of the time budget)."""
    cfg, state, vae = run.cfg, run.state, run.modules["vae"]
    if not state["vae_done"]:
        bar = tqdm(total=cfg.vae_steps, initial=state["vae_step"], desc="vae", dynamic_ncols=True, mininterval=1)
        while state["vae_step"] < cfg.vae_steps and time.time() < deadline:
            loss = vae_step(vae, run.optimizers["vae"], cfg, pool, state["vae_step"], run.seed, run.device)
            state["vae_step"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            run.maybe_checkpoint()
        bar.close()
        state["vae_done"] = True
    vae.eval().requires_grad_(False)


def train_diffusion(run: Run, max_steps: int | None, deadline: float) -> None:
    """Phase 3: ε-MSE steps on text encoder + UNet with EMA, sample grids as it goes, until max_steps or the deadline."""
    cfg, state, m = run.cfg, run.state, run.modules
    bar = tqdm(total=max_steps, initial=state["step"], desc="diffusion", dynamic_ncols=True, mininterval=1)
    step_time, step0 = 0.0, state["step"]  # time in training steps alone (not samples, saves)
    while (max_steps is None or state["step"] < max_steps) and time.time() < deadline:
        t0 = time.time()
        loss = diffusion_step(m["unet"], m["text_encoder"], run.optimizers["diffusion"], cfg, run.data,
                              state["step"], run.seed, run.device)
        ema_update(m["ema_unet"], m["unet"], cfg.ema_decay, state["step"])
        ema_update(m["ema_text_encoder"], m["text_encoder"], cfg.ema_decay, state["step"])
        step_time += time.time() - t0
        state["step"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"diffusion loss became {loss} at step {state['step']}; the last checkpoint is kept")
        if state["step"] % cfg.sample_every == 0:
            pipe = build_pipeline(m["vae"], m["ema_text_encoder"].eval(), m["ema_unet"].eval())
            write_samples(pipe, run.out / "samples" / f"step-{state['step']:06d}.png", cfg.sample_seeds,
                          cfg.sample_steps)
        run.maybe_checkpoint()
    bar.close()
    if state["step"] > step0:
        state["s_per_step"] = step_time / (state["step"] - step0)


# ----------------------------------------------------------------------------- the run


def new_run(out: Path, cfg: TrainConfig, seed: int, device: str, resume: bool) -> Run:
    """Build the models and optimizers, then warm-start them or resume the checkpoint in `out`."""
    torch.manual_seed(seed)
    vae, text_encoder, unet = build_vae(cfg), build_text_encoder(cfg), build_unet(cfg)
    ema_text, ema_unet = copy.deepcopy(text_encoder).requires_grad_(False), copy.deepcopy(unet).requires_grad_(False)
    modules = {"vae": vae, "text_encoder": text_encoder, "unet": unet, "ema_text_encoder": ema_text,
               "ema_unet": ema_unet}
    for module in modules.values():
        module.to(device)
    optimizers = {
        "vae": torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr),
        "diffusion": torch.optim.AdamW([*text_encoder.parameters(), *unet.parameters()], lr=cfg.lr,
                                       weight_decay=cfg.weight_decay),
    }
    state = {"seed": seed, "device": device, "vae_step": 0, "vae_done": False, "step": 0, "elapsed_s": 0.0,
             "scaling_factor": 1.0}
    run = Run(cfg, out, seed, device, modules, optimizers, state)
    resuming = resume and (run.ckpt_dir / "state.json").exists()
    if cfg.warm_start and not resuming:
        warm_start(cfg.warm_start, vae, text_encoder, unet, ema_text, ema_unet)
        state["vae_done"] = cfg.vae_steps == 0  # the warm-started VAE is kept unless more VAE steps are asked for
    if resuming:
        run.state = load_checkpoint(run.ckpt_dir, modules, optimizers)
        if run.state["seed"] != seed:
            raise EsdError(f"{run.ckpt_dir} was trained with seed {run.state['seed']}, not {seed}; "
                           "pass that seed or --no-resume")
        print(f"resumed from {run.ckpt_dir}: VAE step {run.state['vae_step']}, diffusion step {run.state['step']}",
              file=sys.stderr)
    run.start = time.time() - run.state["elapsed_s"]
    return run


def train_testbed(
    out_dir: str | Path,
    seed: int = 0,
    minutes: float = 60.0,
    device: str = "cpu",
    max_steps: int | None = None,
    resume: bool = True,
    config: TrainConfig | None = None,
) -> Path:
    """Train the testbed pipeline into `out_dir` (diffusers folder + classifier/ + eval/ + README.md).

    Stops after `max_steps` diffusion steps or when `minutes` (counted over resumed runs too) are spent.
    A checkpoint in `<out_dir>/checkpoint/` is written every `config.checkpoint_minutes` and on Ctrl-C; with
    `resume` a later call continues from it. Returns `out_dir`.
    """
    cfg = config or TrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # small models: TF32 is plenty and faster
        torch.backends.cudnn.allow_tf32 = True
    run = new_run(out, cfg, seed, device, resume)
    budget_s = minutes * 60
    pool, shapes, colours, styles = render_pool(cfg.pool_size, seed, cfg.p_solid)
    try:
        # --- 2. the autoencoder, then the pool's latents
        train_vae(run, pool, deadline=run.start + cfg.vae_time_share * budget_s)
        labels = torch.stack([shapes, colours, styles], dim=1)
        run.data = latent_data(run.modules["vae"], cfg, pool, labels, run.state, device)
        # --- 3. text encoder + UNet, jointly
        train_diffusion(run, max_steps, deadline=run.start + budget_s)
        run.checkpoint()
    except KeyboardInterrupt:
        run.checkpoint()
        print(f"\ninterrupted: checkpoint saved to {run.ckpt_dir}; run the same command again to resume",
              file=sys.stderr)
        raise
    # --- 4. ship: EMA pipeline, classifier, measured quality, model card
    return finish(run)


def ship_tokenizer(folder: Path) -> None:
    """Replace the saved tokenizer by the project's vocab.json + merges.txt: smaller, and loadable by transformers 4.x."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(TOKENIZER_DIR, folder)


def finish(run: Run) -> Path:
    """Save the EMA pipeline, train the classifier if missing, measure quality and write the model card."""
    from esd.testbed.classifier import train_classifier
    from esd.testbed.evaluate import evaluate_testbed
    from esd.testbed.text import similarity_report

    cfg, state, out, m = run.cfg, run.state, run.out, run.modules
    pipe = build_pipeline(m["vae"].eval(), m["ema_text_encoder"].eval(), m["ema_unet"].eval())
    pipe.save_pretrained(out, safe_serialization=True)
    ship_tokenizer(out / "tokenizer")
    write_samples(pipe, out / "samples" / "final.png", cfg.sample_seeds, cfg.sample_steps)
    if not (out / "classifier" / "config.json").exists():
        train_classifier(out / "classifier", seed=run.seed, steps=cfg.classifier_steps, device=run.device,
                         pool_size=cfg.classifier_pool)
    clf = json.loads((out / "classifier" / "config.json").read_text())
    state["classifier_accuracy"] = {k: v for k, v in clf.items() if k.endswith("accuracy")}
    metrics = None
    if cfg.eval_seeds > 0:
        metrics = evaluate_testbed(pipe, out / "eval", erased=None, seeds_per_prompt=cfg.eval_seeds,
                                   steps=cfg.eval_steps, classifier_path=out / "classifier")
    sizes = {name: n_params(m[key]) for name, key in
             (("unet", "ema_unet"), ("text_encoder", "ema_text_encoder"), ("vae", "vae"))}
    command = (
        f"esd testbed train --seed {run.seed} --device {state['device']} --output {out} "
        f"--batch-size {cfg.batch_size} --vae-steps {state['vae_step']} --max-steps {state['step']}"
        + (f" --warm-start {cfg.warm_start}" if cfg.warm_start else "")
    )
    write_model_card(out, cfg, state, sizes, metrics, command, similarity_report(m["ema_text_encoder"]))
    shutil.rmtree(out / "checkpoint", ignore_errors=True)  # the shipped folder holds only the pipeline
    return out
