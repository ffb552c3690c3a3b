"""Partial DDIM sampling is a prefix of full DDIM sampling, and x_t and t agree on the noise level."""

import pytest
import torch

from esd.models import encode_prompt
from esd.sampling import band_timestep, ddim_scheduler, predict_prompts, sample_until, unet_denoiser

N = 10


@pytest.fixture(scope="module")
def setup():
    from esd.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=1)
    cond, null = encode_prompt(pipe, "a red circle"), encode_prompt(pipe, "")
    z_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    return pipe, cond, null, z_T


def _pipeline_states(pipe, cond, null, z_T, guidance):
    """Latents of diffusers' own StableDiffusionPipeline after each DDIM update, from the same z_T."""
    states = [z_T.clone()]

    def record(pipeline, i, t, kwargs):
        states.append(kwargs["latents"].clone())
        return kwargs

    pipe.scheduler = ddim_scheduler(pipe.scheduler.config, N)
    pipe(prompt_embeds=cond.embeds, negative_prompt_embeds=null.embeds, latents=z_T.clone(), num_inference_steps=N,
         guidance_scale=guidance, output_type="latent", callback_on_step_end=record)
    return states  # states[j] = after j updates = noise level of timesteps[j]


@pytest.mark.parametrize("k", [N - 1, N - 2, 5, 0])
def test_sample_until_step_k_equals_prefix_of_full_ddim_run(setup, k):
    pipe, cond, null, z_T = setup
    states = _pipeline_states(pipe, cond, null, z_T, guidance=3.0)
    scheduler = ddim_scheduler(pipe.scheduler.config, N)
    x = sample_until(unet_denoiser(pipe.unet), scheduler, z_T, cond, null, 3.0, k)
    assert torch.allclose(x, states[N - 1 - k], atol=1e-5), f"k={k}"
    if k == N - 1:
        assert torch.equal(x, z_T)  # no update at all: pure noise for the noisiest step


def test_batched_and_separate_guidance_forwards_agree(setup):
    pipe, cond, null, z_T = setup
    scheduler = ddim_scheduler(pipe.scheduler.config, N)
    eps = unet_denoiser(pipe.unet)
    a = sample_until(eps, scheduler, z_T, cond, null, 3.0, 2, batched=True)
    b = sample_until(eps, scheduler, z_T, cond, null, 3.0, 2, batched=False)
    assert torch.allclose(a, b, atol=1e-5)


def test_each_band_holds_the_ddim_timestep_of_its_step():
    scheduler = ddim_scheduler({"num_train_timesteps": 1000, "steps_offset": 1}, 50)
    timesteps = scheduler.timesteps.tolist()  # descending, τ_49 = 981 first
    gen = torch.Generator().manual_seed(0)
    for k in range(50):
        low, high = round(k / 50 * 1000), round((k + 1) / 50 * 1000)
        tau_k = timesteps[50 - 1 - k]  # the noise level sample_until(k) stops at
        assert low <= tau_k < high
        draws = {band_timestep(k, 50, 1000, gen) for _ in range(200)}
        assert draws <= set(range(low, high)) and len(draws) > 10  # uniform over the band, not a constant


def test_larger_k_means_noisier_latent(setup):
    pipe, cond, null, z_T = setup
    scheduler = ddim_scheduler(pipe.scheduler.config, N)
    eps = unet_denoiser(pipe.unet)
    # distance to the starting noise shrinks as k grows (fewer updates)
    dist = [(sample_until(eps, scheduler, z_T, cond, null, 3.0, k) - z_T).norm().item() for k in (1, 5, 8)]
    assert dist[0] > dist[1] > dist[2]


def test_frozen_predictions_in_one_forward_equal_separate_forwards(setup):
    pipe, cond, null, z_T = setup
    eps = unet_denoiser(pipe.unet)
    t = torch.tensor([437])
    other = encode_prompt(pipe, "a blue square")
    with torch.no_grad():
        one = predict_prompts(eps, z_T, t, [null, cond, other], batched=True)
        separate = [eps(z_T, t, c) for c in (null, cond, other)]
    assert len(one) == 3
    for a, b in zip(one, separate, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(one[0], one[1])  # the prompts really differ in the batch
