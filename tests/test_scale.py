"""Speed and memory options: mixed precision, trajectory reuse, data-parallel processes (gloo on CPU)."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from esd.config import EraseConfig
from esd.erase import erase
from esd.examples import Slot, draw_example
from esd.models import encode_prompt
from esd.prepare import prepare_unet
from esd.sampling import ddim_scheduler, sample_trajectory, sample_until, unet_denoiser


def _cfg(out, **kw):
    base = dict(concept="a red circle", iterations=2, ddim_steps=4, lr=1e-3, grid_steps=0, device="cpu",
                save_every=0, output=str(out))
    base.update(kw)
    return EraseConfig(**base)


def test_bf16_keeps_trained_parameters_and_adam_state_in_fp32(tiny_pipe, tmp_path):
    cfg = _cfg(tmp_path, precision="bf16")
    params, trained, frozen = prepare_unet(cfg, tiny_pipe.unet, torch.device("cpu"))
    assert all(p.dtype == torch.float32 for p in params.values())
    frozen_dtypes = {p.dtype for n, p in tiny_pipe.unet.named_parameters() if n not in params}
    assert frozen_dtypes == {torch.bfloat16}
    # a real run in bf16 on CPU: θ and Adam's moments stay fp32, the loss is finite
    from esd.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0)
    seen = {}

    def spy(i, loss):
        seen["dtypes"] = {p.dtype for n, p in pipe.unet.named_parameters() if p.requires_grad}
        seen["frozen"] = {p.dtype for n, p in pipe.unet.named_parameters() if not p.requires_grad}

    result = erase(cfg, pipe=pipe, progress=False, on_step=spy)
    assert seen == {"dtypes": {torch.float32}, "frozen": {torch.bfloat16}}
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_trajectory_states_are_the_partial_samples(tiny_pipe):
    cond, null = encode_prompt(tiny_pipe, "a red circle"), encode_prompt(tiny_pipe, "")
    scheduler = ddim_scheduler(tiny_pipe.scheduler.config, 6)
    eps = unet_denoiser(tiny_pipe.unet)
    z_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    states = sample_trajectory(eps, scheduler, z_T, cond, null, 3.0)
    assert len(states) == 6
    for k in range(6):  # the state handed out for step k has step k's noise level: the same DDIM state
        assert torch.allclose(states[k], sample_until(eps, scheduler, z_T, cond, null, 3.0, k), atol=1e-5)


def test_trajectory_reuse_draws_r_examples_from_one_run(tiny_pipe, tmp_path):
    cfg = _cfg(tmp_path, trajectory_reuse=3, ddim_steps=5)
    conds = {p: encode_prompt(tiny_pipe, p) for p in ["", "a red circle"]}
    eps = unet_denoiser(tiny_pipe.unet)
    scheduler = ddim_scheduler(tiny_pipe.scheduler.config, 5)
    slot = Slot.seeded(0)
    examples = [draw_example(cfg, conds, eps, eps, scheduler, (1, 4, 8, 8), slot) for _ in range(4)]
    # examples 0-2 come from one trajectory: each x_t is that run's state at its own k
    z_T = torch.randn((1, 4, 8, 8), generator=_after_one_randint(0, 5))
    run = sample_trajectory(eps, scheduler, z_T, conds["a red circle"], conds[""], cfg.start_guidance)
    for ex in examples[:3]:
        assert torch.allclose(ex.x_t, run[ex.k], atol=1e-5)
    assert not torch.allclose(examples[3].x_t, run[examples[3].k], atol=1e-3)  # the 4th starts a new run


def _after_one_randint(seed, n):
    gen = torch.Generator().manual_seed(seed)
    torch.randint(n, (1,), generator=gen)
    return gen


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from esd.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0)
    result = erase(_cfg(out, iterations=2, batch_size=1), pipe=pipe, progress=False)
    torch.save({"params": {n: p.detach() for n, p in pipe.unet.named_parameters() if p.requires_grad},
                "losses": result.losses}, f"{result_path}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.timeout(600)
def test_two_gloo_processes_equal_one_process_with_the_combined_batch(tmp_path):
    from esd.tiny import tiny_sd_pipeline

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "ddp"), str(tmp_path / "res")), nprocs=2, join=True)
    ranks = [torch.load(f"{tmp_path / 'res'}.{r}", weights_only=True) for r in range(2)]
    pipe = tiny_sd_pipeline(seed=0)
    single = erase(_cfg(tmp_path / "one", iterations=2, batch_size=2), pipe=pipe, progress=False)
    assert ranks[0]["losses"] == ranks[1]["losses"]  # every process reports the global mean
    assert ranks[0]["losses"] == pytest.approx(single.losses, rel=1e-4)
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name])  # θ stays identical on every process
        # The two processes average gradients in another float order than one batch does, and Adam divides by the
        # gradients' own size, so tiny differences grow: 1e-5 is 1% of one step at lr 1e-3 (seen: 1.8e-6).
        assert torch.allclose(value, pipe.unet.get_parameter(name).detach(), atol=1e-5), name
    assert (tmp_path / "ddp" / "esd.safetensors").exists()  # rank 0 wrote the outputs


def test_gradient_checkpointing_follows_need_unless_asked(tiny_pipe, tmp_path, monkeypatch, capsys):
    """Auto: on when the estimate of training memory without it exceeds what the device has free; a flag wins."""
    from esd import prepare

    unet, cpu = tiny_pipe.unet, torch.device("cpu")
    need = sum(p.numel() for p in unet.parameters()) * 4 * (4 + 1)  # fp32 size x (4 + batch size 1)
    monkeypatch.setattr(prepare, "free_memory", lambda device: need - 1)
    assert prepare.checkpointing_by_need(_cfg(tmp_path), unet, cpu)[0] is True
    monkeypatch.setattr(prepare, "free_memory", lambda device: need + 1)
    on, why = prepare.checkpointing_by_need(_cfg(tmp_path), unet, cpu)
    assert on is False and why.startswith("auto: about")
    assert prepare.checkpointing_by_need(_cfg(tmp_path, batch_size=4), unet, cpu)[0] is True  # more activations
    assert prepare.checkpointing_by_need(_cfg(tmp_path, gradient_checkpointing=True), unet, cpu) == (True, "as asked")

    result = erase(_cfg(tmp_path), pipe=tiny_pipe)  # the run says which it chose, and the config as run records it
    assert result.config.gradient_checkpointing is False and not unet.is_gradient_checkpointing
    assert "gradient checkpointing: off (auto: about" in capsys.readouterr().out


@pytest.mark.slow
def test_compile_gives_the_eager_result(tmp_path, monkeypatch):
    """--compile wraps the denoiser in torch.compile; θ and ε*'s swapped values flow through the compiled graph.

    The backend is torch's "aot_eager" here (dynamo tracing and AOT autograd, no C++ build: inductor took 198 s
    to compile the tiny UNet's forward alone on the 2-core CI machine); what is tested is this package's use
    of the compiled module, not inductor's code generation."""
    from safetensors.torch import load_file

    from esd import prepare
    from esd.tiny import tiny_sd_pipeline

    monkeypatch.setattr(prepare, "COMPILE_BACKEND", "aot_eager")
    results = {}
    for compiled in (False, True):
        pipe = tiny_sd_pipeline(seed=0)
        erase(_cfg(tmp_path / str(compiled), compile=compiled, gradient_checkpointing=False), pipe=pipe, progress=False)
        results[compiled] = load_file(str(tmp_path / str(compiled) / "esd.safetensors"))
        assert (getattr(pipe.unet, "_compiled_call_impl", None) is not None) == compiled
    base = tiny_sd_pipeline(seed=0).unet.state_dict()
    assert any(not torch.equal(v, base[k]) for k, v in results[False].items())  # the erase moved θ
    for name, value in results[False].items():
        torch.testing.assert_close(results[True][name], value, rtol=1e-5, atol=1e-6)


def test_half_precision_on_a_cpu_that_emulates_it_says_so():
    from esd.prepare import native_bf16, precision_note

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert "without native bf16" in precision_note(cpu, "bf16", native=False)
    assert "--precision fp32 is faster" in precision_note(cpu, "bf16", native=False)
    assert "without native fp16" in precision_note(cpu, "fp16", native=True)  # fp16 is not probed: always said on a CPU
    assert precision_note(cpu, "bf16", native=True) is None
    assert precision_note(cpu, "fp32", native=False) is None
    assert precision_note(gpu, "bf16", native=False) is None  # the GPU decides, not the host CPU
    assert isinstance(native_bf16(), bool)
