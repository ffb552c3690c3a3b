"""SD3/SD3.5 and FLUX.1 (flow matching) end to end, on tiny pipelines built in-process (offline, CPU).

What is pinned: Eq. 5 in velocity space is the ε-space target exactly; our network call and Euler sampler walk
the pipelines' own trajectories (SD3's shifted grid and true CFG, FLUX's patch packing, position ids,
resolution shift and guidance input); training timesteps lie in their step's band of sigmas; the parameter
sets by role; `esd erase | generate` through the CLI write and apply exactly the selected tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from esd.cli import main
from esd.config import EraseConfig
from esd.loss import esd_target
from esd.models import describe_model, encode_prompt, model_family, prediction_type, samples_without_cfg
from esd.networks import forward, network
from esd.sampling import ddim_scheduler, ddim_states, step_timestep, unet_denoiser
from esd.selection import TRANSFORMER_RULES, trainable_names
from esd.tiny import tiny_flux2_pipeline, tiny_flux_pipeline, tiny_sd3_pipeline

BUILDERS = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline,
            "flux-schnell": lambda: tiny_flux_pipeline(guidance_embeds=False), "flux2": tiny_flux2_pipeline,
            "flux2-distilled": lambda: tiny_flux2_pipeline(distilled=True)}


def test_family_and_output_are_detected():
    sd3, flux, flux2 = tiny_sd3_pipeline(), tiny_flux_pipeline(), tiny_flux2_pipeline()
    assert (model_family(sd3), model_family(flux), model_family(flux2)) == ("sd3", "flux", "flux2")
    assert prediction_type(sd3) == prediction_type(flux) == prediction_type(flux2) == "flow"
    assert describe_model(sd3, 64).startswith("SD3/SD3.5 (StableDiffusion3Pipeline), flow matching")
    assert describe_model(flux, 64).startswith("FLUX.1 (FluxPipeline)")
    assert describe_model(flux2, 64).startswith("FLUX.2 (Flux2KleinPipeline)")
    # x_t is sampled as each pipeline samples: SD3 and klein base with true CFG, FLUX.1 and distilled klein without
    assert [samples_without_cfg(p) for p in (sd3, flux, tiny_flux_pipeline(guidance_embeds=False), flux2,
                                             tiny_flux2_pipeline(distilled=True))] == [False, True, True, False, True]


def test_eq5_in_velocity_space_is_the_epsilon_target():
    """x_σ = (1−σ)x_0 + σε and v = ε − x_0 give ε = x_σ + (1−σ)v: ε is affine in v at a fixed x_σ, and Eq. 5's
    weights (1+η, −η) sum to one, so the v target maps to the ε target exactly."""
    g = torch.Generator().manual_seed(0)
    x, v_null, v_c = (torch.randn(2, 16, 4, 4, generator=g) for _ in range(3))
    for sigma in (0.1, 0.5, 0.93):
        for eta in (1.0, 3.0):
            expected = esd_target(x + (1 - sigma) * v_null, x + (1 - sigma) * v_c, eta)
            torch.testing.assert_close(x + (1 - sigma) * esd_target(v_null, v_c, eta), expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_sd3_sampler_walks_the_pipelines_own_trajectory():
    pipe = tiny_sd3_pipeline()
    n, guidance = 5, 4.0
    z = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    theirs = pipe(prompt="a red circle", latents=z.clone(), num_inference_steps=n, guidance_scale=guidance,
                  height=64, width=64, output_type="latent").images
    scheduler = ddim_scheduler(pipe.scheduler.config, n)
    eps = unet_denoiser(network(pipe))
    cond, null = encode_prompt(pipe, "a red circle"), encode_prompt(pipe, "")
    states = list(ddim_states(eps, scheduler, z, cond, null, guidance))
    assert len(states) == n
    # our N states stop at the last grid sigma; the pipeline takes one more Euler step, to σ = 0
    v = eps(torch.cat([states[-1]] * 2), scheduler.timesteps[-1].expand(2), _cat(null, cond)).chunk(2)
    last = states[-1] + (0 - scheduler.sigmas[-2]) * (v[0] + guidance * (v[1] - v[0]))
    torch.testing.assert_close(last, theirs, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_flux_forward_and_sampler_match_the_pipeline():
    """Packing into 2x2 patches, position ids, σ as the timestep, the guidance input and the resolution shift."""
    from diffusers import FluxPipeline

    pipe = tiny_flux_pipeline()
    n, guidance = 4, 3.5
    z = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    packed = FluxPipeline._pack_latents(z.clone(), 1, 16, 8, 8)
    theirs = pipe(prompt="a red circle", latents=packed, num_inference_steps=n, guidance_scale=guidance,
                  height=64, width=64, output_type="latent").images
    theirs = FluxPipeline._unpack_latents(theirs, 64, 64, pipe.vae_scale_factor)
    scheduler = ddim_scheduler(pipe.scheduler.config, n, image_seq_len=16)
    cond = encode_prompt(pipe, "a red circle", guidance=guidance)
    eps = unet_denoiser(network(pipe))
    states = list(ddim_states(eps, scheduler, z, cond, cond, 1.0))  # distilled: no true CFG
    last = states[-1] + (0 - scheduler.sigmas[-2]) * eps(states[-1], scheduler.timesteps[-1].expand(1), cond)
    torch.testing.assert_close(last, theirs, rtol=1e-4, atol=1e-5)
    # the guidance is an input of the network: another scale, another prediction
    other = encode_prompt(pipe, "a red circle", guidance=1.0)
    t = scheduler.timesteps[:1]
    assert not torch.allclose(forward(network(pipe), z, t, cond), forward(network(pipe), z, t, other))


@torch.no_grad()
def test_flux2_forward_and_sampler_match_the_pipeline():
    """FLUX.2 klein: the latent's 2x2 patches as 128 channels in the pipeline's order, 4-axis position ids, σ as
    the timestep, true CFG with "" and the empirical shift by image size and number of steps."""
    from diffusers import Flux2KleinPipeline

    pipe = tiny_flux2_pipeline()
    n, guidance = 4, 4.0
    z = torch.randn(1, 32, 16, 16, generator=torch.Generator().manual_seed(3))  # the VAE latent of 64 px
    patched = Flux2KleinPipeline._patchify_latents(z)
    theirs = pipe(prompt="a red circle", latents=patched.clone(), num_inference_steps=n, guidance_scale=guidance,
                  height=64, width=64, output_type="latent").images
    scheduler = ddim_scheduler(pipe.scheduler.config, n, image_seq_len=64, empirical_mu=True)
    eps = unet_denoiser(network(pipe))
    cond, null = encode_prompt(pipe, "a red circle"), encode_prompt(pipe, "")
    states = list(ddim_states(eps, scheduler, z, cond, null, guidance))
    v = eps(torch.cat([states[-1]] * 2), scheduler.timesteps[-1].expand(2), _cat(null, cond)).chunk(2)
    last = states[-1] + (0 - scheduler.sigmas[-2]) * (v[0] + guidance * (v[1] - v[0]))
    # output_type="latent" gives the VAE latent back, unpacked and unpatchified by the pipeline itself
    torch.testing.assert_close(last, theirs, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_flux2_guidance_input_where_the_checkpoint_takes_one():
    """FLUX.2-dev's transformer takes the guidance scale as an input (as FLUX.1-dev): the conditioning carries
    --start-guidance, x_t is sampled with one prediction per step, and another scale is another prediction."""
    from diffusers import Flux2Transformer2DModel

    pipe = tiny_flux2_pipeline()
    pipe.transformer = Flux2Transformer2DModel(**{**pipe.transformer.config, "guidance_embeds": True})
    assert samples_without_cfg(pipe)
    cond, other = encode_prompt(pipe, "a red circle", guidance=4.0), encode_prompt(pipe, "a red circle", guidance=1.0)
    assert cond.added["guidance"].item() == 4.0
    z, t = torch.randn(1, 32, 16, 16), torch.tensor([500.0])
    assert not torch.allclose(forward(network(pipe), z, t, cond), forward(network(pipe), z, t, other))


def _cat(a, b):
    from esd.networks import Cond

    return Cond.cat(a, b)


@pytest.mark.parametrize("family", ["sd3", "flux", "flux2"])
def test_training_timesteps_lie_in_their_steps_band_of_sigmas(family):
    pipe = BUILDERS[family]()
    n = 6
    scheduler = ddim_scheduler(pipe.scheduler.config, n, image_seq_len=16, empirical_mu=family == "flux2")
    levels = scheduler.sigmas[:-1].flip(0).tolist()  # step k's own noise level, ascending in k
    g = torch.Generator().manual_seed(0)
    for k in range(n):
        draws = [step_timestep(k, scheduler, g) / 1000 for _ in range(50)]
        high = levels[k + 1] if k + 1 < n else levels[k]
        assert all(levels[k] - 1e-6 <= s <= high + 1e-6 for s in draws), (k, min(draws), max(draws))
    assert abs(levels[-1] - 1.0) < 1e-6  # the noisiest step is pure noise


@pytest.mark.parametrize("family", ["sd3", "flux", "flux2"])
def test_parameter_sets_by_role(family):
    net = network(BUILDERS[family]())
    names = {m: set(trainable_names(net, m)) for m in TRANSFORMER_RULES}
    text_side = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "norm_added_q", "norm_added_k")
    assert names["xattn"] and all(n.split(".")[3] in text_side for n in names["xattn"])
    assert names["x-strict"] == {n for n in names["xattn"] if ".add_k_proj." in n or ".add_v_proj." in n}
    assert all(n.split(".")[3] in ("to_q", "to_k", "to_v", "to_out", "norm_q", "norm_k")
               for n in names["selfattn"])
    assert not names["xattn"] & names["noxattn"] and not names["xattn"] & names["selfattn"]
    assert not any(n.startswith("single_transformer_blocks.") for n in names["xattn"] | names["selfattn"])
    assert not any(n.startswith(("time_text_embed.", "time_guidance_embed.", "context_embedder.", "proj_out."))
                   for n in names["noxattn"])
    assert names["full"] == {n for n, _ in net.named_parameters()}
    if family.startswith("flux"):
        assert any(n.startswith("single_transformer_blocks.") for n in names["noxattn"])


def _erase(tmp_path, model, *extra) -> int:
    return main(["erase", "--model", str(model), "--concept", "a red circle", "--iterations", "3", "--ddim-steps", "4",
                 "--image-size", "64", "--grid-steps", "2", "--lr", "1e-2", "--device", "cpu",
                 "--output", str(tmp_path / "out"), *extra])


@pytest.mark.parametrize("family,method,extra", [
    ("sd3", "xattn", []), ("sd3", "full", ["--sample-from", "frozen"]), ("flux", "xattn", []),
    ("flux", "noxattn", ["--erase-from", "a circle"]), ("flux-schnell", "x-strict", []), ("flux2", "xattn", []),
    ("flux2-distilled", "noxattn", []),
])
def test_erase_and_generate_through_the_cli(tmp_path, saved, family, method, extra):
    model = saved(family)
    assert _erase(tmp_path, model, "--method", method, *extra) == 0
    out = tmp_path / "out"
    pipe = BUILDERS[family]()
    expected = set(trainable_names(network(pipe), method))
    with safe_open(str(out / "esd.safetensors"), "pt") as f:
        assert set(f.keys()) == expected
        assert f.metadata()["model_family"] == family.split("-")[0]
        assert f.metadata()["prediction_type"] == "flow"
        # --precision auto: the frozen weights in bf16, as these families are run; θ itself stays fp32
        assert EraseConfig.from_json(f.metadata()["esd_config"]).precision == "bf16"
        assert all(f.get_tensor(name).dtype == torch.float32 for name in f.keys())
        changed = [name for name in f.keys()
                   if not torch.equal(f.get_tensor(name), network(pipe).get_parameter(name).detach())]
    assert changed  # training moved the selected tensors (lr 1e-2, 3 steps)
    card = (out / "README.md").read_text()
    assert "the transformer has" in card and "pipe.transformer.load_state_dict" in card
    assert "| precision | frozen weights bf16" in card
    assert (out / "grid.png").is_file() and (out / "loss.png").is_file()

    images = {}
    for name, weights in (("base", []), ("erased", ["--weights", str(out / "esd.safetensors")])):
        assert main(["generate", "--model", str(model), "--prompt", "a red circle", "--steps", "3", "--image-size",
                     "64", "--device", "cpu", "--output", str(tmp_path / name), *weights]) == 0
        (image,) = sorted((tmp_path / name).glob("*.png"))
        images[name] = np.asarray(Image.open(image).convert("RGB"), dtype=np.float32)
    assert np.abs(images["base"] - images["erased"]).max() > 0  # generate applied the weights


@pytest.mark.parametrize("args,message", [
    (["--method", "xlayer"], "has no counterpart"),
    (["--save-compvis"], "no CompVis layout"),
    (["--image-size", "72"], "multiple of 16"),
])
def test_bad_input_on_flux_exits_2_naming_the_problem(tmp_path, saved, capsys, args, message):
    assert _erase(tmp_path, saved("flux"), *args) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------ LoRA


def _lora_family_model(family, saved, tiny_pipe_dir):
    return tiny_pipe_dir if family == "sd1" else saved(family)


@pytest.mark.parametrize("family", ["sd1", "sd3", "flux", "flux2"])
def test_lora_erase_is_a_file_diffusers_loads_and_convert_merges(tmp_path, saved, tiny_pipe_dir, family):
    from diffusers import DiffusionPipeline
    from torch import nn

    from esd.models import load_pipeline
    from esd.weights import apply_esd_weights

    model = _lora_family_model(family, saved, tiny_pipe_dir)
    assert _erase(tmp_path, model, "--lora-rank", "2") == 0
    path = tmp_path / "out" / "esd.safetensors"
    base = load_pipeline(str(model))
    net = network(base)
    prefix = "unet." if family == "sd1" else "transformer."
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["format"] == "esd-lora" and meta["lora_rank"] == "2"
    assert all(k.startswith(prefix) and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    adapted = {k[len(prefix):].rsplit(".lora_", 1)[0] for k in keys}
    selected = {n.rsplit(".", 1)[0] for n in trainable_names(net, "xattn")}
    assert adapted == {m for m in selected if isinstance(net.get_submodule(m), (nn.Linear, nn.Conv2d))}

    ours = load_pipeline(str(model))
    apply_esd_weights(network(ours), path)
    theirs = DiffusionPipeline.from_pretrained(str(model))
    theirs.load_lora_weights(str(path.parent), weight_name="esd.safetensors")  # diffusers' own loader
    theirs.fuse_lora()
    theirs.unload_lora_weights()
    mine, fused, original = (dict(network(p).named_parameters()) for p in (ours, theirs, base))
    moved = [n for n in mine if not torch.equal(mine[n], original[n])]
    assert moved and {n.rsplit(".", 1)[0] for n in moved} <= adapted
    for name in mine:
        torch.testing.assert_close(mine[name], fused[name], rtol=1e-5, atol=1e-6)

    assert main(["convert", str(model), str(tmp_path / "merged"), "--weights", str(path)]) == 0
    merged = dict(network(DiffusionPipeline.from_pretrained(str(tmp_path / "merged"))).named_parameters())
    for name in moved:
        torch.testing.assert_close(merged[name], mine[name])

    images = {}  # generate merges the LoRA file: the same image as the merged folder, another than the base's
    for name, args in (("lora", [str(model), "--weights", str(path)]), ("merged", [str(tmp_path / "merged")]),
                       ("base", [str(model)])):
        assert main(["generate", "--model", *args, "--prompt", "a red circle", "--steps", "2", "--image-size", "64",
                     "--device", "cpu", "--output", str(tmp_path / f"img-{name}")]) == 0
        (image,) = (tmp_path / f"img-{name}").glob("*.png")
        images[name] = np.asarray(Image.open(image).convert("RGB"), dtype=np.float32)
    assert np.abs(images["lora"] - images["merged"]).max() <= 1  # the same weights, up to rounding to 8 bits
    assert np.abs(images["lora"] - images["base"]).max() > 0


@pytest.mark.parametrize("family,comfy_key", [("sd3", "transformer_blocks.0.attn.add_q_proj.weight"),
                                               ("flux", "x_embedder.weight")])
def test_convert_writes_the_erased_transformer_as_comfyui_reads_it(tmp_path, saved, family, comfy_key):
    """`esd convert MODEL out.safetensors --weights W`: the whole erased transformer under diffusers names (the
    names ComfyUI's Load Diffusion Model node maps itself), in the dtype the base folder stores."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from esd.models import load_pipeline
    from esd.weights import apply_esd_weights

    base = tmp_path / "bf16"
    DiffusionPipeline.from_pretrained(str(saved(family)), dtype=torch.bfloat16).save_pretrained(base)
    assert _erase(tmp_path, base) == 0
    weights = tmp_path / "out" / "esd.safetensors"
    assert main(["convert", str(base), str(tmp_path / "comfy.safetensors"), "--weights", str(weights)]) == 0
    written = load_file(str(tmp_path / "comfy.safetensors"))
    erased = load_pipeline(str(base))
    apply_esd_weights(erased, weights)
    expected = network(erased).state_dict()
    assert set(written) == set(expected) and comfy_key in written
    assert {t.dtype for t in written.values()} == {torch.bfloat16}  # as the base stores it
    for name, value in expected.items():
        torch.testing.assert_close(written[name], value.to(torch.bfloat16))
    with safe_open(str(weights), "pt") as f:  # the erased tensors are in it, not the base's
        name = next(iter(f.keys()))
        torch.testing.assert_close(written[name], f.get_tensor(name).to(torch.bfloat16))
    assert main(["convert", str(base), str(tmp_path / "comfy.ckpt"), "--weights", str(weights)]) == 2
    assert main(["convert", str(base), str(tmp_path / "x.safetensors"), "--to", "compvis"]) == 2


def test_no_comfyui_file_for_a_transformer_comfyui_does_not_map(tmp_path, saved, capsys):
    assert main(["convert", str(saved("flux2")), str(tmp_path / "x.safetensors")]) == 2
    assert "covers SD3 and FLUX.1" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()


def test_lora_rank_below_one_exits_2(tmp_path, saved, capsys):
    assert _erase(tmp_path, saved("sd3"), "--lora-rank", "0") == 2
    assert "--lora-rank must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["sd3", "flux", "flux2"])
def test_a_transformer_single_file_erases_with_the_rest_from_config(tmp_path, saved, capsys, family):
    """A transformer file (as ComfyUI and the release files hold it) with --config naming the pipeline for the
    rest loads as the pipeline folder itself and erases through the CLI; without --config, or with another
    family's, exit 2."""
    from safetensors.torch import save_file

    folder = saved(family)
    single = tmp_path / f"{family}.safetensors"
    save_file({k: v.contiguous() for k, v in network(BUILDERS[family]()).state_dict().items()}, str(single))
    from esd.models import load_pipeline

    loaded, own = load_pipeline(str(single), config=str(folder)), load_pipeline(str(folder))
    assert type(loaded) is type(own) and loaded.esd_source == str(single)
    mine, theirs = network(loaded).state_dict(), network(own).state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert main(["erase", "--model", str(single), "--config", str(folder), "--concept", "a red circle",
                 "--iterations", "2", "--ddim-steps", "2", "--image-size", "64", "--grid-steps", "0", "--device",
                 "cpu", "--lr", "1e-2", "--output", str(tmp_path / "file")]) == 0
    with safe_open(str(tmp_path / "file" / "esd.safetensors"), "pt") as f:
        assert set(f.keys()) == set(trainable_names(network(own), "xattn"))
    assert main(["generate", "--model", str(single), "--config", str(folder), "--prompt", "a red circle", "--steps",
                 "2", "--image-size", "64", "--device", "cpu", "--weights", str(tmp_path / "file" / "esd.safetensors"),
                 "--output", str(tmp_path / "images")]) == 0
    assert len(list((tmp_path / "images").glob("*.png"))) == 1

    capsys.readouterr()
    args = ["erase", "--concept", "x", "--iterations", "1", "--device", "cpu", "--output", str(tmp_path / "bad")]
    assert main([*args, "--model", str(single)]) == 2
    err = capsys.readouterr().err
    assert "holds the transformer only" in err and "pass --config" in err
    other = saved("flux" if family == "sd3" else "sd3")
    assert main([*args, "--model", str(single), "--config", str(other)]) == 2
    assert "pass a pipeline of the same family" in capsys.readouterr().err
