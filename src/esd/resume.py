"""Stop and go on: resumable checkpoints of an erase, `OUTPUT/checkpoint-{step}/` (the diffusers convention).

A checkpoint holds everything the next iteration depends on, so a resumed run goes on exactly where the
stopped one was (bit for bit on the CPU):

    esd.safetensors          θ, an ESD weights file (`esd generate --weights` takes it as well)
    optimizer.pt             Adam's state                                   torch.save, read back with
    scheduler.pt             the lr schedule's state                        weights_only=True: loading a
    scaler.pt                the fp16 gradient scaler's state (else empty)  checkpoint never unpickles code
    random_states_{rank}.pt  every example slot of that process: its random.Random, its torch.Generator and,
                             with --trajectory-reuse, the cached trajectory and what it was sampled for
    state.json               the step, the losses so far, the seconds spent, the number of processes, the config

It is written into `.checkpoint-{step}.tmp/` and renamed into place, so a folder named `checkpoint-N` is
complete whatever moment the run was killed at; a checkpoint is renamed away before it is deleted. Which
checkpoint a run resumes, and when it refuses to: `resume_point`. docs/design.md, "Resume".
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from esd import __version__
from esd.config import EraseConfig
from esd.distributed import Dist, barrier, global_mean
from esd.errors import EsdError
from esd.lora import exported
from esd.weights import load_esd_weights, save_esd_weights

CHECKPOINT = re.compile(r"checkpoint-(\d+)")

# Settings that do not change what is trained: a checkpoint is resumed whatever their values.
NEUTRAL = frozenset({"output", "device", "devices", "gradient_checkpointing", "compile", "grid_steps", "grid_prompts", "recipe",
                     "save_every", "save_every_seconds", "checkpoints_total_limit", "resume", "overwrite",
                     "save_compvis", "compvis_format", "save_kohya"})


@dataclass
class TrainState:
    """What an iteration changes: θ, Adam, the lr schedule, the gradient scaler, the example slots, the losses."""

    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    slots: list  # esd.erase.Slot, each with state_dict() / load_state_dict()
    losses: list[float]
    seconds: float = 0.0  # wall time of the earlier sessions of this run

    @property
    def step(self) -> int:
        return len(self.losses)


def checkpoints(out: str | Path) -> list[Path]:
    """The complete checkpoints in `out`, oldest first (temporary and half-deleted ones have other names)."""
    found = [p for p in Path(out).glob("checkpoint-*") if CHECKPOINT.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest(out: str | Path) -> Path | None:
    """The checkpoint with the highest step in `out`, if any."""
    found = checkpoints(out)
    return found[-1] if found else None


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise EsdError(f"{path}: not a readable checkpoint ({err})") from err


# Settings read only by --robust: without it on both sides they do not change training, so a checkpoint written
# before a release changed one of their defaults still resumes.
ROBUST_ONLY = frozenset(f.name for f in dataclasses.fields(EraseConfig) if f.name.startswith("robust_"))


def differences(saved: EraseConfig, cfg: EraseConfig) -> dict[str, tuple]:
    """{field: (checkpoint's value, this run's)} for the settings that change training."""
    a, b = dataclasses.asdict(saved), dataclasses.asdict(cfg)
    unread = NEUTRAL | (ROBUST_ONLY if not (saved.robust or cfg.robust) else frozenset())
    return {k: (a[k], b[k]) for k in a if k not in unread and a[k] != b[k]}


def resume_point(cfg: EraseConfig, out: Path, main: bool) -> Path | None:
    """The checkpoint this run goes on from, or None to start at step 0.

    --overwrite: none (the output's checkpoints are removed). --resume latest|PATH: that one, whatever its
    settings. Neither: the output's latest checkpoint if it was written with the same settings (fields in
    NEUTRAL aside); a checkpoint of other settings is refused, naming them, never silently overwritten.
    """
    if main:
        for stale in Path(out).glob(".checkpoint-*"):  # left by a run killed while saving or deleting
            shutil.rmtree(stale, ignore_errors=True)
    if cfg.overwrite:
        if main and checkpoints(out):
            print(f"--overwrite: removing {len(checkpoints(out))} checkpoint(s) in {out}; starting at step 0")
            for path in checkpoints(out):
                remove(path)
        return None
    if cfg.resume not in (None, "latest"):
        path = Path(cfg.resume)
        if not (path / "state.json").is_file():
            path = latest(path)  # an output folder: its latest checkpoint
        if path is None:
            raise EsdError(f"--resume {cfg.resume}: not a checkpoint folder (checkpoint-N, holding state.json) "
                           "nor an output folder holding one")
    else:
        path = latest(out)
        if path is None:
            if cfg.resume == "latest" and main:
                print(f"--resume latest: no checkpoint in {out}; starting at step 0")
            return None
    state = read_state(path)
    changed = differences(EraseConfig.from_json(json.dumps(state["config"])), cfg)
    said = ", ".join(f"--{k.replace('_', '-')} {a!r} (now {b!r})" for k, (a, b) in changed.items())
    if changed and cfg.resume is None:
        raise EsdError(f"{out} holds {path.name}, from a run with other settings: {said}. To go on from it "
                       f"with this command's settings add --resume latest (or --resume {path}); to start "
                       "again add --overwrite (removes its checkpoints); or give another --output")
    if main:
        print(f"resuming from {path} (step {state['step']} of {cfg.iterations})"
              + (f" with changed settings: {said}" if changed else "")
              + ("" if cfg.resume else "; --overwrite starts again instead"))
    return path


def _save(obj, path: Path) -> None:
    torch.save(obj, path)
    _fsync(path)


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only, no code


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk, so a rename after it never exposes an empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Delete a checkpoint: first renamed away, so that a half-deleted one never looks complete."""
    trash = path.with_name(f".{path.name}.deleting")
    os.replace(path, trash)
    shutil.rmtree(trash)


def save(out: Path, state: TrainState, cfg: EraseConfig, metadata: dict[str, str], seconds: float,
         d: Dist) -> Path:
    """Write `out/checkpoint-{step}` atomically (every process its own random states), prune old ones, and
    rewrite `out/esd.safetensors` with θ, so that the weights so far can be used as they are.

    Every process must call it: processes other than rank 0 write only their random_states file.
    `seconds`: the run's wall time so far, all sessions.
    """
    final, tmp = out / f"checkpoint-{state.step}", out / f".checkpoint-{state.step}.tmp"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(d)
    _save([slot.state_dict() for slot in state.slots], tmp / f"random_states_{d.rank}.pt")
    barrier(d)
    if d.main:
        save_esd_weights(tmp / "esd.safetensors", state.params, metadata)
        _fsync(tmp / "esd.safetensors")
        _save(state.optimizer.state_dict(), tmp / "optimizer.pt")
        _save(state.lr_schedule.state_dict(), tmp / "scheduler.pt")
        _save(state.scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "state.json").write_text(json.dumps({
            "step": state.step, "losses": state.losses, "seconds": seconds, "world": d.world,
            "config": json.loads(cfg.to_json()), "esd_version": __version__}, indent=1))
        _fsync(tmp / "state.json")
        _fsync(tmp)
        if final.exists():  # the same step saved again (stopped right after resuming from it)
            remove(final)
        os.replace(tmp, final)
        _fsync(out)
        if cfg.checkpoints_total_limit:
            for old in checkpoints(out)[:-cfg.checkpoints_total_limit]:
                remove(old)
        save_esd_weights(out / "esd.safetensors", exported(state.params, metadata), metadata)
    barrier(d)
    return final


def load(path: Path, state: TrainState, cfg: EraseConfig, d: Dist, device: torch.device) -> None:
    """Put a checkpoint's θ, optimizer, schedule, scaler, slots and losses into `state`, checking that they fit."""
    saved = read_state(path)
    if saved["world"] != d.world:
        raise EsdError(f"{path} was written by {saved['world']} processes; resume it with as many "
                       f"(this run has {d.world}), or the examples drawn would not go on as they were")
    tensors, _ = load_esd_weights(path / "esd.safetensors")
    if set(tensors) != set(state.params):
        raise EsdError(f"{path} trained other UNet parameters than this run's --method or model")
    slots = _load(path / f"random_states_{d.rank}.pt")
    if len(slots) != len(state.slots):
        raise EsdError(f"{path} has {len(slots)} example slots per process, this run {len(state.slots)}: "
                       "resume it with the same --batch-size")
    with torch.no_grad():
        for name, p in state.params.items():
            p.copy_(tensors[name])
    state.optimizer.load_state_dict(_load(path / "optimizer.pt"))
    schedule = state.lr_schedule
    schedule.load_state_dict(_load(path / "scheduler.pt"))
    # The lr comes from this run's settings: the saved ones, unless --resume went on with another --lr. Adam's
    # groups (esd.erase.parameter_groups): θ at --lr, then a trained text encoder's at --text-encoder-lr.
    schedule.base_lrs = [cfg.lr, cfg.text_encoder_lr or cfg.lr][: len(schedule.base_lrs)]
    for group, base, factor in zip(state.optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas, strict=True):
        group["initial_lr"], group["lr"] = base, base * factor(schedule.last_epoch)
    scaler = _load(path / "scaler.pt")
    if scaler and state.scaler.is_enabled():
        state.scaler.load_state_dict(scaler)
    for slot, slot_state in zip(state.slots, slots, strict=True):
        slot.load_state_dict(slot_state, device)
    state.losses[:] = saved["losses"]
    state.seconds = saved["seconds"]


def due(cfg: EraseConfig, step: int, seconds_since_save: float) -> bool:
    """Whether --save-every or --save-every-seconds asks for a checkpoint after `step` iterations."""
    by_count = cfg.save_every > 0 and step % cfg.save_every == 0
    return by_count or 0 < cfg.save_every_seconds <= seconds_since_save


def agree(flags: list[bool], d: Dist, device: torch.device) -> list[bool]:
    """Each flag, true if it is true on any process: all of them stop and save at the same step."""
    if d.world == 1:
        return flags
    return (global_mean(torch.tensor(flags, dtype=torch.float32, device=device), d.world) > 0).tolist()


class StopSignals:
    """While active, Ctrl-C (SIGINT) and SIGTERM ask the loop to stop after the current iteration, save a
    checkpoint and end; a second signal acts as usual. Only the main thread can take signals (the app's
    worker thread stops through on_step instead)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self._restore()
        print(f"\n{signal.Signals(signum).name}: stopping after this iteration to save a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()
