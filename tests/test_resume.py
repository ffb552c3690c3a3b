"""Stop and go on: a run stopped at any step and resumed ends bit for bit equal to the uninterrupted run (CPU);
checkpoints are atomic, pruned and refused when the settings differ; SIGKILL at any moment leaves readable files."""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from esd.cli import main
from esd.config import EraseConfig
from esd.erase import erase, parameter_of
from esd.errors import EsdError, NonFiniteLossError
from esd.resume import checkpoints, differences, latest, read_state
from esd.tiny import tiny_sd_pipeline
from esd.weights import load_esd_weights

ITERATIONS = 5

# Each keeps some part of the state a resume must restore: the concept draws, the lr schedule, the cached
# trajectory and its uses left, several slots with their kept prompt and phrasing, the gradient scaler, the
# adversarial prefix of each slot and a trained text encoder.
OPTIONS = {
    "plain": {},
    "two-concepts-cosine": dict(concept="a red circle; a blue square", separator=";", lr_schedule="cosine"),
    "trajectory-reuse": dict(trajectory_reuse=3),
    "batch-retain-contexts": dict(batch_size=2, retain=["a blue square"], contexts=["{}", "a red {}"]),
    "fp16-grad-scaler": dict(precision="fp16"),
    "robust-text-encoder": dict(robust=True, robust_steps=2, robust_every=2, robust_adversary="prefix+word+inversion",
                                train_text_encoder=True, text_encoder_lr=1e-3, retain=["a blue square"],
                                contexts=["{}", "a red {}"]),
}
# (iteration index to stop after, how): on_step returning True, raising KeyboardInterrupt, or a SIGTERM.
STOPS = [(0, "return"), (2, "keyboard"), (3, "sigterm")]


def _cfg(out, **kw) -> EraseConfig:
    base = dict(concept="a red circle", iterations=ITERATIONS, ddim_steps=4, lr=1e-2, grid_steps=0, device="cpu",
                save_every=0, output=str(out))
    return EraseConfig(**{**base, **kw})


def _theta(pipe, names) -> dict[str, torch.Tensor]:
    return {n: parameter_of(pipe, n).detach().clone() for n in names}


def _stopper(k: int, how: str):
    def on_step(i, loss):
        if i == k:
            if how == "keyboard":
                raise KeyboardInterrupt
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)  # handled: stop after this iteration, save, end
            return how == "return"
    return on_step


def _stop(cfg: EraseConfig, pipe, k: int, how: str) -> None:
    """Run `cfg` and stop it after iteration k: it must leave checkpoint-{k+1}."""
    if how == "return":
        assert erase(cfg, pipe=pipe, progress=False, on_step=_stopper(k, how)).stopped_early
    else:
        with pytest.raises(KeyboardInterrupt):
            erase(cfg, pipe=pipe, progress=False, on_step=_stopper(k, how))
    assert latest(cfg.output).name == f"checkpoint-{k + 1}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of an option: (losses, θ), computed once per option."""
    done = {}

    def run(option: str):
        if option not in done:
            pipe = tiny_sd_pipeline(seed=0)
            result = erase(_cfg(tmp_path_factory.mktemp(option), **OPTIONS[option]), pipe=pipe, progress=False)
            done[option] = (result.losses, _theta(pipe, result.trained))
        return done[option]

    return run


def _assert_equal(result, pipe, expected) -> None:
    losses, theta = expected
    assert result.losses == losses
    for name, value in theta.items():
        assert torch.equal(parameter_of(pipe, name).detach(), value), name


@pytest.mark.parametrize(("k", "how"), STOPS)
@pytest.mark.parametrize("option", OPTIONS)
def test_a_stopped_run_resumed_ends_bit_for_bit_equal_to_the_uninterrupted_one(tiny_pipe, tmp_path, reference,
                                                                                option, k, how, capsys):
    cfg = _cfg(tmp_path / "out", **OPTIONS[option])
    _stop(cfg, copy.deepcopy(tiny_pipe), k, how)
    saved = read_state(latest(cfg.output))
    assert saved["step"] == k + 1 and saved["losses"] == reference(option)[0][: k + 1]
    load_esd_weights(tmp_path / "out" / "esd.safetensors")  # the weights so far, usable as they are
    capsys.readouterr()

    pipe = copy.deepcopy(tiny_pipe)
    result = erase(cfg, pipe=pipe, progress=False)  # the same command again: resumes on its own
    assert f"resuming from {tmp_path / 'out' / f'checkpoint-{k + 1}'} (step {k + 1} of {ITERATIONS})" in \
        capsys.readouterr().out
    _assert_equal(result, pipe, reference(option))
    assert not checkpoints(cfg.output)  # a finished run leaves esd.safetensors, not its checkpoints
    assert f"| iterations | {ITERATIONS} of {ITERATIONS} |" in (tmp_path / "out" / "README.md").read_text()
    assert (tmp_path / "out" / "loss.png").is_file()


def test_stopped_twice_and_resumed_from_a_path_elsewhere(tiny_pipe, tmp_path, reference):
    cfg = _cfg(tmp_path / "a", save_every=1, checkpoints_total_limit=2, **OPTIONS["trajectory-reuse"])
    _stop(cfg, copy.deepcopy(tiny_pipe), 0, "return")
    _stop(cfg, copy.deepcopy(tiny_pipe), 3, "keyboard")  # resumed at 1, stopped again at 4
    assert [p.name for p in checkpoints(cfg.output)] == ["checkpoint-3", "checkpoint-4"]  # the limit prunes
    # an older checkpoint, into another output folder: the same run goes on from step 3
    pipe = copy.deepcopy(tiny_pipe)
    moved = _cfg(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"), **OPTIONS["trajectory-reuse"])
    _assert_equal(erase(moved, pipe=pipe, progress=False), pipe, reference("trajectory-reuse"))


def test_latest_is_the_highest_complete_checkpoint(tmp_path):
    for name in ("checkpoint-9", "checkpoint-10", ".checkpoint-11.tmp", ".checkpoint-12.deleting", "checkpoint-x"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-13").write_text("a file, not a checkpoint")
    assert latest(tmp_path) == tmp_path / "checkpoint-10"
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10"]
    assert latest(tmp_path / "missing") is None


def test_other_settings_are_refused_naming_them_and_the_flags(tiny_pipe, tmp_path, reference, capsys):
    cfg = _cfg(tmp_path / "out")
    _stop(cfg, copy.deepcopy(tiny_pipe), 1, "return")
    (tmp_path / "out" / ".checkpoint-9.tmp").mkdir()  # a half-written checkpoint, as a kill leaves it
    with pytest.raises(EsdError, match=r"--lr 0\.01 \(now 0\.001\).*--resume latest.*--overwrite.*--output"):
        erase(_cfg(tmp_path / "out", lr=1e-3), pipe=copy.deepcopy(tiny_pipe), progress=False)
    with pytest.raises(EsdError, match="--iterations 5 \\(now 6\\), --seed 0 \\(now 1\\)"):
        erase(_cfg(tmp_path / "out", iterations=6, seed=1), pipe=copy.deepcopy(tiny_pipe), progress=False)
    assert latest(cfg.output).name == "checkpoint-2"  # refusing changed nothing

    # settings that do not change training may differ; the stale temporary folder is ignored, then removed
    pipe = copy.deepcopy(tiny_pipe)
    neutral = _cfg(tmp_path / "out", save_every=3, save_every_seconds=0.0, checkpoints_total_limit=1,
                   gradient_checkpointing=False)
    _assert_equal(erase(neutral, pipe=pipe, progress=False), pipe, reference("plain"))
    assert not (tmp_path / "out" / ".checkpoint-9.tmp").exists()


def test_robust_settings_block_a_resume_only_when_the_run_is_robust():
    old, new = EraseConfig(concept="circle", robust_images=8), EraseConfig(concept="circle", robust_images=16)
    assert differences(old, new) == {}  # a default --robust changed between releases: a plain run still resumes
    robust = {"robust": True}
    assert differences(EraseConfig(concept="circle", robust_images=8, **robust),
                       EraseConfig(concept="circle", robust_images=16, **robust)) == {"robust_images": (8, 16)}
    assert differences(old, EraseConfig(concept="circle", robust_images=16, **robust)) == {
        "robust": (False, True), "robust_images": (8, 16)}


def test_resume_latest_forces_changed_settings_and_overwrite_starts_again(tiny_pipe, tmp_path, reference, capsys):
    losses = reference("plain")[0]
    _stop(_cfg(tmp_path / "out"), copy.deepcopy(tiny_pipe), 1, "return")
    capsys.readouterr()
    forced = erase(_cfg(tmp_path / "out", lr=1e-3, resume="latest"), pipe=copy.deepcopy(tiny_pipe), progress=False)
    assert "with changed settings: --lr 0.01 (now 0.001)" in capsys.readouterr().out
    # losses[2] is taken before the first update at the new lr
    assert forced.losses[:3] == losses[:3] and all(a != b for a, b in zip(forced.losses[3:], losses[3:], strict=True))

    _stop(_cfg(tmp_path / "again"), copy.deepcopy(tiny_pipe), 2, "return")
    capsys.readouterr()
    pipe = copy.deepcopy(tiny_pipe)
    fresh = erase(_cfg(tmp_path / "again", overwrite=True), pipe=pipe, progress=False)
    assert "--overwrite: removing 1 checkpoint(s)" in capsys.readouterr().out
    _assert_equal(fresh, pipe, reference("plain"))  # from step 0, not from the old checkpoint

    with pytest.raises(EsdError, match="--resume and --overwrite"):
        _cfg(tmp_path, resume="latest", overwrite=True).validate()
    with pytest.raises(EsdError, match="--resume .*not a checkpoint folder"):
        erase(_cfg(tmp_path / "new", resume=str(tmp_path / "nothing")), pipe=copy.deepcopy(tiny_pipe), progress=False)
    with pytest.raises(EsdError, match="--save-every-seconds"):
        _cfg(tmp_path, save_every_seconds=-1.0).validate()


def test_a_non_finite_loss_keeps_the_last_good_checkpoint_and_resuming_it_works(tiny_pipe, tmp_path, reference):
    cfg = _cfg(tmp_path / "out", save_every=2)
    poisoned = copy.deepcopy(tiny_pipe)

    def poison(i, loss):
        if i == 2:  # after the 3rd update (checkpoint-2 already written) a weight becomes NaN
            with torch.no_grad():
                poisoned.unet.get_parameter(
                    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight")[0, 0] = float("nan")

    with pytest.raises(NonFiniteLossError, match="iteration 4.*checkpoint-2 keeps the last good state"):
        erase(cfg, pipe=poisoned, progress=False, on_step=poison)
    assert [p.name for p in checkpoints(cfg.output)] == ["checkpoint-2"]
    assert not (tmp_path / "out" / "README.md").exists()
    pipe = copy.deepcopy(tiny_pipe)
    _assert_equal(erase(cfg, pipe=pipe, progress=False), pipe, reference("plain"))


def test_cli_refuses_other_settings_in_one_line_and_lists_the_flags(tiny_pipe_dir, tmp_path, capsys):
    flags = ["--concept", "a red circle", "--model", str(tiny_pipe_dir), "--iterations", "3", "--ddim-steps", "4",
             "--grid-steps", "0", "--device", "cpu", "--output", str(tmp_path / "out")]
    cfg = _cfg(tmp_path / "out", model=str(tiny_pipe_dir), iterations=3, lr=1e-5)
    erase(cfg, progress=False, on_step=lambda i, loss: True)
    capsys.readouterr()
    assert main(["erase", *flags, "--lr", "1e-3"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("esd erase:")]
    assert len(errors) == 1 and "--lr 1e-05 (now 0.001)" in errors[0] and "--resume latest" in errors[0]
    with pytest.raises(SystemExit):
        main(["erase", "--help"])
    usage = capsys.readouterr().out
    for flag in ("--resume", "--overwrite", "--save-every-seconds", "--checkpoints-total-limit"):
        assert flag in usage


# --- two processes ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    runs = {}
    for name, stop in (("ref", None), ("stopped", lambda i, loss: i == 1), ("resumed", None)):
        pipe = tiny_sd_pipeline(seed=0)
        out = f"{root}/{'ref' if name == 'ref' else 'run'}"
        result = erase(_cfg(out, iterations=4, trajectory_reuse=2), pipe=pipe, progress=False, on_step=stop)
        runs[name] = {"losses": result.losses, "theta": _theta(pipe, result.trained)}
        if name == "stopped":
            runs[name]["files"] = sorted(p.name for p in latest(out).iterdir())
    torch.save(runs, f"{root}/result.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_gloo_processes_resume_exactly(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"result.{r}", weights_only=True) for r in range(2)]
    for runs in ranks:
        assert "random_states_0.pt" in runs["stopped"]["files"] and "random_states_1.pt" in runs["stopped"]["files"]
        assert runs["resumed"]["losses"] == runs["ref"]["losses"] == ranks[0]["ref"]["losses"]
        for name, value in runs["ref"]["theta"].items():
            assert torch.equal(runs["resumed"]["theta"][name], value), name
            assert torch.equal(ranks[1]["ref"]["theta"][name], value), name


# --- SIGKILL at any moment ----------------------------------------------------------------------------------


def _readable(out: Path) -> Path | None:
    """esd.safetensors (if any) and the latest checkpoint (if any) load cleanly; returns that checkpoint."""
    if (out / "esd.safetensors").exists():
        load_esd_weights(out / "esd.safetensors")
    last = latest(out)
    if last is not None:
        state = read_state(last)
        assert state["step"] == int(last.name.split("-")[1]) == len(state["losses"])
        assert set(load_esd_weights(last / "esd.safetensors")[0])
        for path in last.glob("*.pt"):
            torch.load(path, weights_only=True)
    return last


def _has(out, prefix: str, suffix: str) -> bool:
    try:
        return any(e.name.startswith(prefix) and e.name.endswith(suffix) for e in os.scandir(out))
    except FileNotFoundError:
        return False


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before the moment it was to be killed at"
        assert time.monotonic() < deadline, "the moment to kill at never came"
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.timeout(240)
def test_sigkill_at_any_moment_leaves_readable_files_and_the_run_resumes(tiny_pipe_dir, tmp_path, capsys):
    out, log = tmp_path / "out", tmp_path / "log"
    flags = ["--concept", "a red circle", "--model", str(tiny_pipe_dir), "--iterations", "24", "--ddim-steps", "4",
             "--lr", "1e-2", "--save-every", "1", "--grid-steps", "0", "--device", "cpu", "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def launch() -> subprocess.Popen:
        with log.open("w") as f:  # the child keeps its own copy of the file
            return subprocess.Popen([sys.executable, "-m", "esd.cli", "erase", *flags], stdout=f,
                                    stderr=subprocess.STDOUT, env=env)

    def resumed_at(last) -> None:
        if last is not None:
            assert f"resuming from {last}" in log.read_text()

    def resumed_and(ready):
        return lambda: "resuming" in log.read_text() and ready()

    # Kill while a checkpoint folder is being written; after resuming, while esd.safetensors is being written;
    # after resuming again, at whatever moment comes 0.25 s later.
    moments = [
        lambda: (out / "checkpoint-2").is_dir() and _has(out, ".checkpoint-", ".tmp"),
        resumed_and(lambda: _has(out, ".esd.safetensors.", ".tmp")),
        resumed_and(lambda: not time.sleep(0.25)),
    ]
    last = None
    for ready in moments:
        proc = launch()
        _kill_when(proc, ready)
        resumed_at(last)
        last = _readable(out)
        assert last is not None
    assert main(["erase", *flags]) == 0  # the same command once more, in this process to save a start-up
    assert f"resuming from {last}" in capsys.readouterr().out
    assert not checkpoints(out)
    assert "| iterations | 24 of 24 |" in (out / "README.md").read_text()

    # the uninterrupted run, in this process, from the same folder
    cfg = EraseConfig(concept="a red circle", model=str(tiny_pipe_dir), iterations=24, ddim_steps=4, lr=1e-2,
                      grid_steps=0, device="cpu", save_every=0, output=str(tmp_path / "ref"))
    ref = erase(cfg, progress=False)
    weights = load_esd_weights(out / "esd.safetensors")[0]
    reference_weights = load_esd_weights(tmp_path / "ref" / "esd.safetensors")[0]
    assert ref.losses and set(weights) == set(reference_weights)
    for name, value in weights.items():
        assert torch.equal(value, reference_weights[name]), name
