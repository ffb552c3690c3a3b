"""The training loop: what moves, what the frozen model predicts, the Eq. 5 target in both sampling modes."""

import copy
import random

import pytest
import torch
from safetensors import safe_open

from esd.config import EraseConfig
from esd.erase import erase
from esd.errors import NonFiniteLossError
from esd.examples import Slot, draw_example, draw_examples
from esd.frozen import copied_denoiser, original_values, swapped_denoiser
from esd.models import encode_prompt
from esd.networks import Cond
from esd.sampling import ddim_scheduler, sample_trajectory, unet_denoiser
from esd.selection import select_parameters


def _cfg(tmp_path, **kw):
    base = dict(concept="a red circle", iterations=3, ddim_steps=4, lr=1e-2, grid_steps=0, device="cpu",
                save_every=0, output=str(tmp_path / "out"))
    base.update(kw)
    return EraseConfig(**base)


def _perturb(params):
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p) * 0.1)


def test_one_unet_frozen_prediction_equals_a_real_frozen_copy(tiny_pipe):
    unet = tiny_pipe.unet
    reference = copied_denoiser(unet)  # a real frozen copy, taken before any change
    params = select_parameters(unet, "xattn")
    frozen = swapped_denoiser(unet, original_values(params))
    _perturb(params)  # as training would
    trained_values = {n: p.detach().clone() for n, p in params.items()}
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    cond = encode_prompt(tiny_pipe, "a red circle").repeat(2)
    assert not torch.allclose(unet_denoiser(unet)(x, t, cond), reference(x, t, cond), atol=1e-4)
    assert torch.allclose(frozen(x, t, cond), reference(x, t, cond), atol=1e-6)
    # the swap is per call: the live UNet keeps its trained values afterwards
    assert all(torch.equal(p, trained_values[n]) for n, p in params.items())


@pytest.mark.parametrize("method", ["xattn", "noxattn", "x-strict"])
def test_only_the_selected_parameters_move(tiny_pipe, tmp_path, method):
    before = {n: p.detach().clone() for n, p in tiny_pipe.unet.named_parameters()}
    text_before = {n: p.detach().clone() for n, p in tiny_pipe.text_encoder.named_parameters()}
    result = erase(_cfg(tmp_path, method=method), pipe=tiny_pipe, progress=False)
    selected = set(result.trained)
    moved = {n for n, p in tiny_pipe.unet.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= selected
    assert len(moved) >= 0.5 * len(selected)  # Adam moves (nearly) every tensor with a gradient
    assert all(torch.equal(p, text_before[n]) for n, p in tiny_pipe.text_encoder.named_parameters())
    with safe_open(str(tmp_path / "out" / "esd.safetensors"), "pt") as f:
        assert set(f.keys()) == selected  # the file holds exactly the trained tensors
        for name in f.keys():
            assert torch.equal(f.get_tensor(name), tiny_pipe.unet.get_parameter(name).detach())


def _setup(pipe, cfg):
    unet = pipe.unet
    params = select_parameters(unet, cfg.method)
    reference = copied_denoiser(unet)
    frozen = swapped_denoiser(unet, original_values(params))
    _perturb(params)  # make the trained model differ from the frozen one, as mid-training
    conds = {p: encode_prompt(pipe, p) for p in {"", *cfg.concepts, *([cfg.erase_from] if cfg.erase_from else [])}}
    return unet, reference, frozen, conds


def _recording(eps):
    """`eps`, remembering the state of every call: the sampler's first state is z_T itself."""
    states = []

    def wrapped(x, t, cond):
        states.append(x[:1].detach().clone())  # with batched guidance x is [state, state]
        return eps(x, t, cond)

    return wrapped, states


@pytest.mark.parametrize("sample_from", ["esd", "frozen"])
def test_target_follows_the_paper_eta_in_both_sampling_modes(tiny_pipe, tmp_path, sample_from):
    cfg = _cfg(tmp_path, eta=2.0, sample_from=sample_from, ddim_steps=6)
    n, concept = cfg.ddim_steps, cfg.concepts[0]
    unet, reference, frozen, conds = _setup(tiny_pipe, cfg)
    trained = unet_denoiser(unet)
    scheduler = ddim_scheduler(tiny_pipe.scheduler.config, n)
    n_train = scheduler.config.num_train_timesteps
    sampler, states = _recording(trained if sample_from == "esd" else frozen)
    named, other = (trained, reference) if sample_from == "esd" else (reference, trained)  # reference: a real copy
    steps = set()
    for seed in range(8):
        states.clear()
        ex = draw_example(cfg, conds, sampler, frozen, scheduler, (1, 4, 8, 8),
                          Slot(random.Random(0), torch.Generator().manual_seed(seed)))
        # target = e0 − η (ep − e0), η = 2, recomputed independently with the real frozen copy
        e0, ep = reference(ex.x_t, ex.t, conds[""]), reference(ex.x_t, ex.t, conds[concept])
        assert torch.allclose(ex.target, e0 - 2.0 * (ep - e0), atol=1e-5)
        # t lies in step k's band [round(k/N·T), round((k+1)/N·T))
        assert round(ex.k / n * n_train) <= int(ex.t) < round((ex.k + 1) / n * n_train)
        # sampling till step k is N−1−k updates (a larger k: fewer updates, a noisier x_t) ...
        assert len(states) == n - 1 - ex.k
        steps.add(ex.k)
        if not states:
            continue  # k = N−1: x_t is z_T itself, before any update
        # ... and lands on the state of step k of a full run from the same z_T, by the model the mode names
        z_T = states[0] / scheduler.init_noise_sigma  # DDIM's scale_model_input is the identity
        full = sample_trajectory(named, scheduler, z_T, conds[concept], conds[""], cfg.start_guidance)
        assert torch.allclose(ex.x_t, full[ex.k], atol=1e-5)
        by_other = sample_trajectory(other, scheduler, z_T, conds[concept], conds[""], cfg.start_guidance)
        assert not torch.allclose(ex.x_t, by_other[ex.k], atol=1e-4)
    assert len(steps) >= 3, steps  # the seeds reach several steps, not one by chance


def test_an_iterations_examples_sample_together_as_they_would_one_at_a_time(tiny_pipe, tmp_path):
    """The batch's partial trajectories run as one batch, each example leaving at its own k, and the frozen
    targets of the whole batch in one forward: the same draws, x_t, t and targets as one example at a time, in
    max(N−1−k) sampler forwards instead of Σ(N−1−k)."""
    cfg = _cfg(tmp_path, ddim_steps=6, retain=["a blue square", "a green triangle"], batch_size=5)
    unet, reference, frozen, conds = _setup(tiny_pipe, cfg)
    conds |= {p: encode_prompt(tiny_pipe, p) for p in cfg.retain}
    scheduler = ddim_scheduler(tiny_pipe.scheduler.config, cfg.ddim_steps)
    calls = []

    def counted(x, t, cond):
        calls.append(len(x))
        return unet_denoiser(unet)(x, t, cond)

    frozen_calls = []

    def frozen_counted(x, t, cond):
        frozen_calls.append(len(x))
        return frozen(x, t, cond)

    together = draw_examples(cfg, conds, counted, frozen_counted, scheduler, (1, 4, 8, 8),
                             [Slot.seeded(s) for s in range(5)])
    batched_calls, calls[:] = len(calls), []
    assert frozen_calls == [5 * 3]  # every example's guidance start, concept and kept prompt in one forward
    alone = [draw_example(cfg, conds, counted, frozen_counted, scheduler, (1, 4, 8, 8), Slot.seeded(s))
             for s in range(5)]
    ks = [ex.k for ex in together]
    assert len(set(ks)) > 1 and ks == [ex.k for ex in alone]  # several stopping steps, the same draws
    assert batched_calls == max(cfg.ddim_steps - 1 - k for k in ks) and len(calls) == sum(5 - k for k in ks)
    for a, b in zip(together, alone, strict=True):
        assert (a.concept, a.retain_text, int(a.t)) == (b.concept, b.retain_text, int(b.t))
        assert torch.allclose(a.x_t, b.x_t, atol=1e-5) and torch.allclose(a.retain[1], b.retain[1], atol=1e-5)
        assert torch.allclose(a.target, b.target, atol=1e-5)


def test_erase_from_conditions_on_the_context(tiny_pipe, tmp_path):
    cfg = _cfg(tmp_path, concept="a red circle", erase_from="a red square", eta=1.0)
    unet, reference, frozen, conds = _setup(tiny_pipe, cfg)
    ex = draw_example(cfg, conds, unet_denoiser(unet), frozen, ddim_scheduler(tiny_pipe.scheduler.config, 4),
                      (1, 4, 8, 8), Slot(random.Random(0), torch.Generator().manual_seed(1)))
    ef, e0, ep = (reference(ex.x_t, ex.t, conds[p]) for p in ("a red square", "", "a red circle"))
    assert torch.allclose(ex.target, ef - (ep - e0), atol=1e-5)
    assert ex.prompt is conds["a red square"]


def test_several_concepts_are_drawn_one_per_iteration(tiny_pipe, tmp_path):
    cfg = _cfg(tmp_path, concept="a red circle; a blue square", separator=";")
    conds = {p: encode_prompt(tiny_pipe, p) for p in ["", *cfg.concepts]}
    eps = unet_denoiser(tiny_pipe.unet)
    scheduler = ddim_scheduler(tiny_pipe.scheduler.config, cfg.ddim_steps)
    slot = Slot.seeded(0)
    drawn = [draw_example(cfg, conds, eps, eps, scheduler, (1, 4, 8, 8), slot).concept for _ in range(12)]
    assert set(drawn) == {"a red circle", "a blue square"}


def test_two_device_layout_gives_the_same_examples_as_one_unet(tiny_pipe, tmp_path):
    twin = copy.deepcopy(tiny_pipe)
    a = erase(_cfg(tmp_path / "a", iterations=2), pipe=tiny_pipe, progress=False)
    b = erase(_cfg(tmp_path / "b", iterations=2, devices="cpu,cpu"), pipe=twin, progress=False)
    assert a.losses == pytest.approx(b.losses, rel=1e-4)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_pipe, tmp_path):
    cfg = _cfg(tmp_path, iterations=10, save_every=2)

    def poison(i, loss):
        if i == 2:  # after the 3rd update (checkpoint of step 2 already written) a weight becomes NaN
            with torch.no_grad():
                tiny_pipe.unet.get_parameter("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight")[0, 0] = float("nan")

    with pytest.raises(NonFiniteLossError, match="iteration 4"):
        erase(cfg, pipe=tiny_pipe, progress=False, on_step=poison)
    out = tmp_path / "out"
    with safe_open(str(out / "esd.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "2"
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())
    assert not (out / "README.md").exists()  # the run did not finish: no model card claims it did
    assert not list(out.glob("*.tmp"))


def test_cond_repeat_and_cat_keep_sdxl_extras():
    a = Cond(torch.zeros(1, 3, 2), {"text_embeds": torch.zeros(1, 4)})
    b = Cond(torch.ones(1, 3, 2), {"text_embeds": torch.ones(1, 4)})
    both = Cond.cat(a.repeat(2), b.repeat(2))
    assert both.embeds.shape == (4, 3, 2) and both.added["text_embeds"].shape == (4, 4)
