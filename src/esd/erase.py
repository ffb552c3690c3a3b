"""The ESD training loop (paper Algorithm 1), readable top to bottom.

    repeat `iterations` times:
        w  ~ W                    one concept per iteration
        k  ~ U[0, N)              which DDIM step
        x  = DDIM(ε_θ, s, w) from z_T till step k       (no grad; ε* with --sample-from frozen)
        t  ~ U(band of step k)
        target = ε*(x,t,"") − η (ε*(x,t,w) − ε*(x,t,""))     Eq. 5
        Adam step on θ to minimise ‖ε_θ(x,t,w) − target‖²

Opt-in --contexts (w in a phrasing, guidance from the phrasing without w) and --retain (prompts held to ε*):
docs/design.md, "Phrasings and retained prompts". Drawing an example and its loss: esd/examples.py.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from esd import __version__, resume
from esd.adversary import adversary, image_bank
from esd.config import ETA_CONVENTION, EraseConfig, adversary_modes
from esd.distributed import average_gradients, barrier, example_seeds, global_mean
from esd.errors import NonFiniteLossError
from esd.examples import Slot, batch_loss, draw_examples
from esd.lora import exported
from esd.lowrank import kept_in
from esd.models import default_image_size, model_family, prediction_type, save_esd_weights
from esd.networks import is_transformer, network
from esd.prepare import Setup, autocast, setup
from esd.recipes import Resolution, resolved_as_given
from esd.weights import TEXT_ENCODER


@dataclass
class EraseResult:
    output: Path
    losses: list[float] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)  # parameter names
    seconds: float = 0.0
    stopped_early: bool = False
    compvis: Path | None = None  # the CompVis single file, with --save-compvis
    kohya: Path | None = None  # the LoRA in kohya's layout, with --save-kohya
    half: dict[str, tuple[float, float]] | None = None  # {"fp16"/"bf16": (share of the change kept, error)}
    config: EraseConfig | None = None  # as run
    resolution: Resolution | None = None  # the recipe it started from and where each setting came from
    work: dict[str, float] = field(default_factory=dict)  # images through the network per iteration, by part


def parameter_of(pipe, name: str) -> torch.nn.Parameter:
    """A trained parameter by its weights-file name: the denoising network's, or `text_encoder.<name>`."""
    if name.startswith(TEXT_ENCODER):
        return pipe.text_encoder.get_parameter(name[len(TEXT_ENCODER):])
    return network(pipe).get_parameter(name)


def esd_metadata(cfg: EraseConfig, pipe, step: int, trained: list[str]) -> dict[str, str]:
    """What goes into the safetensors header: the whole config, the base model and versions."""
    import diffusers

    net = network(pipe)
    lora = {"lora_rank": str(cfg.lora_rank), "lora_alpha": str(cfg.lora_rank)} if cfg.lora_rank else {}
    return {
        "format": "esd-lora" if cfg.lora_rank else "esd-unet-subset",
        "network": "transformer" if is_transformer(net) else "unet",  # the pipeline attribute θ belongs to
        **lora,
        "esd_config": cfg.to_json(),
        "base_model": str(getattr(pipe, "esd_source", cfg.model)),
        "model_family": model_family(pipe),
        "prediction_type": prediction_type(pipe),
        "image_size": str(cfg.image_size or default_image_size(pipe)),
        "method": cfg.method,
        "concepts": " | ".join(cfg.concepts),
        "eta_convention": ETA_CONVENTION,
        "step": str(step),
        "trained_parameters": str(sum(parameter_of(pipe, n).numel() for n in trained)),
        "esd_version": __version__,
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
    }


def parameter_groups(cfg: EraseConfig, params: dict[str, torch.nn.Parameter]) -> list[dict]:
    """Adam's parameter groups: θ at --lr, and a trained text encoder at --text-encoder-lr when given."""
    text = [p for n, p in params.items() if n.startswith(TEXT_ENCODER)]
    rest = [p for n, p in params.items() if not n.startswith(TEXT_ENCODER)]
    if not text or cfg.text_encoder_lr is None:
        return [{"params": rest + text}]
    return [{"params": rest}, {"params": text, "lr": cfg.text_encoder_lr}]


def lr_factor(cfg: EraseConfig, step: int) -> float:
    """Multiplier of --lr at optimizer step `step`: 1 (constant, the paper) or a cosine decay to 0 over the run.

    With the large learning rates a small model needs, a constant-lr run ends wherever its last noisy steps
    left it; decaying the rate is meant to let θ settle (docs/testbed.md, "Oscillation and the opt-in fixes").
    """
    if cfg.lr_schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(step, cfg.iterations) / cfg.iterations))


def erase(cfg: EraseConfig, pipe=None, progress: bool = True,
          on_step: Callable[[int, float], bool | None] | None = None,
          resolution: Resolution | None = None) -> EraseResult:
    """Run ESD with exactly `cfg` and write the outputs. `on_step(i, loss)` may return True to stop early.

    A given `pipe` is trained in place (its UNet ends up erased); otherwise `cfg.model` is loaded.
    `resolution` (from `esd.recipes.resolve`, as the CLI and the app make it) says which recipe, flag or model
    folder chose each setting: it is printed first and goes into the model card and recipe.json.
    Under torchrun/`accelerate launch` each process draws its own examples and gradients are averaged.
    A checkpoint in the output folder is resumed (`esd.resume.resume_point`). Stopping early, Ctrl-C and
    SIGTERM (and on_step raising KeyboardInterrupt) save a checkpoint; the last two then raise KeyboardInterrupt.
    """
    from esd.artifacts import before_images, write_outputs  # plotting/imaging only when needed

    resolution = resolution or resolved_as_given(cfg)
    s = setup(cfg, pipe, progress, resolution)
    if s.cfg.robust and "inversion" in adversary_modes(s.cfg.robust_adversary) and not s.cfg.erase_from:
        s.bank = image_bank(s)  # the original model's images of the concept, before θ moves
        s.work.images.clear()  # a one-off at setup, not a cost per iteration
    cfg, pipe, device, d, params = s.cfg, s.pipe, s.device, s.dist, s.params
    progress = progress and d.main
    out = Path(cfg.output or cfg.default_output())
    checkpoint = resume.resume_point(cfg, out, d.main)
    with autocast(cfg, device):
        before = before_images(pipe, cfg, s.size) if d.main else []  # θ still at its original values

    optimizer = torch.optim.Adam(parameter_groups(cfg, params), lr=cfg.lr)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, cfg))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")  # fp16 gradients underflow
    slots = [Slot.seeded(seed) for seed in example_seeds(cfg.seed, d.rank, cfg.batch_size)]
    result = EraseResult(output=out, trained=list(params), config=cfg, resolution=resolution)
    state = resume.TrainState(params, optimizer, lr_schedule, scaler, slots, result.losses)
    if checkpoint is not None:
        resume.load(checkpoint, state, cfg, d, device)
    start = saved_at = time.perf_counter()
    bar = tqdm(range(state.step, cfg.iterations), initial=state.step, total=cfg.iterations,
               desc=f"ESD {cfg.method}", disable=not progress)
    with resume.StopSignals() as signals, bar:  # the bar is closed on an error too
        for i in bar:
            loss, concept = train_step(s, state, i, out)
            result.losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}", concept=concept[:20])
            if on_step is not None:
                try:
                    result.stopped_early = bool(on_step(i, loss))
                except KeyboardInterrupt:  # raised between iterations: the state is whole, save it
                    signals.requested = True
            interrupted, result.stopped_early, due = resume.agree(
                [signals.requested, result.stopped_early, resume.due(cfg, i + 1, time.perf_counter() - saved_at)],
                d, device)
            if i + 1 < cfg.iterations and (interrupted or result.stopped_early or due):
                saved = resume.save(out, state, cfg, esd_metadata(cfg, pipe, i + 1, result.trained),
                                    state.seconds + time.perf_counter() - start, d)
                saved_at = time.perf_counter()
                if interrupted:
                    bar.close()
                    if d.main:
                        print(f"saved {saved}; run the same command again to go on from it", file=sys.stderr)
                    raise KeyboardInterrupt
            if result.stopped_early:
                break

    result.seconds = state.seconds + time.perf_counter() - start
    result.work = s.work.per_iteration(checkpointing=cfg.gradient_checkpointing)
    if d.main:
        with autocast(cfg, device):
            finish(cfg, pipe, params, result, before, s.size, write_outputs, s.base)
    barrier(d)
    return result


def train_step(s: Setup, state: resume.TrainState, i: int, out: Path) -> tuple[float, str]:
    """One iteration: draw the batch, the loss, one Adam step on θ. Returns (the global mean loss, a concept)."""
    cfg, d, params = s.cfg, s.dist, state.params
    sample_conds = s.text if cfg.train_text_encoder and cfg.sample_from == "esd" else None
    with autocast(cfg, s.device):
        batch = draw_examples(cfg, s.conds, s.sampler, s.frozen, s.scheduler, s.latent_shape, state.slots,
                              s.guidance, sample_conds)
        if cfg.robust:
            with s.work.during("adversary"):
                for n, (slot, example) in enumerate(zip(state.slots, batch, strict=True)):
                    example.adversary = adversary(s, slot, example, n + i, i % cfg.robust_every == 0)
        loss = batch_loss(cfg, s.trained, batch, s.text)
    shown = global_mean(loss.detach(), d.world)  # every process sees the same number, and stops together
    if not torch.isfinite(shown):
        last = resume.latest(out)
        hint = (f"{last} keeps the last good state: go on from it with a smaller --lr or --eta and --resume latest"
                if last else f"{out / 'esd.safetensors'} keeps the last good weights, if any; try a smaller --lr or --eta")
        raise NonFiniteLossError(f"loss is {shown.item()} at iteration {i + 1}; stopped. {hint}.")
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    s.work.iterations += 1
    average_gradients(params.values(), d.world)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.lr_schedule.step()
    if s.text is not None and s.text.trains:
        s.text.clear()  # θ moved: the trained encoder's conditioning is stale
    return shown.item(), batch[0].concept


def finish(cfg: EraseConfig, pipe, params, result: EraseResult, before, size: int, write_outputs,
           base: dict[str, torch.Tensor] | None = None) -> None:
    """Final weights, the optional CompVis and kohya files, and the card, plot and grid beside them."""
    out = result.output
    if base is not None:  # how much of the change a half-precision copy of the model would keep
        erased = {n: p.detach().cpu() for n, p in params.items()}
        result.half = {name: kept_in(base, erased, dtype) for name, dtype in (("fp16", torch.float16),
                                                                               ("bf16", torch.bfloat16))}
    metadata = esd_metadata(cfg, pipe, len(result.losses), result.trained)
    save_esd_weights(out / "esd.safetensors", exported(params, metadata), metadata)
    if cfg.save_compvis:
        from esd.compvis import export_pipeline

        dtype = torch.float32 if cfg.precision != "fp32" else None  # one precision in the file (θ is fp32)
        result.compvis = export_pipeline(pipe, out / f"compvis.{cfg.compvis_format}", base_file=cfg.model,
                                         dtype=dtype, text_encoder=cfg.train_text_encoder)
    if cfg.save_kohya:
        from esd.export import export_lora

        result.kohya, _ = export_lora(out / "esd.safetensors", out / "esd-kohya.safetensors", "kohya")
    write_outputs(out, cfg, pipe, result, before, size)
    if len(result.losses) >= cfg.iterations:  # done: esd.safetensors supersedes the checkpoints
        for path in resume.checkpoints(out):
            resume.remove(path)
