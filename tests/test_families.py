"""Every Stable Diffusion family end to end: SD2.x v-prediction and SDXL next to SD1.x (offline, tiny models).

What is pinned: the v-prediction target equals the ε-space Eq. 5 target converted to v; our partial
sampler walks the pipeline's own trajectory (SDXL size ids, zero unconditional input, v outputs); method
selection on the real-size layouts; `esd erase | generate | convert` on saved folders and a CompVis file.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from esd import compvis
from esd.cli import main
from esd.config import EraseConfig
from esd.errors import EsdError
from esd.examples import Slot, draw_example
from esd.frozen import copied_denoiser, original_values, swapped_denoiser
from esd.models import default_image_size, encode_prompt, model_family, prediction_type
from esd.sampling import ddim_scheduler, sample_until, unet_denoiser
from esd.selection import RULES, group_table, select_parameters, trainable_names
from esd.tiny import tiny_sd2_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

BUILDERS = {"sd2-v": tiny_sd2_pipeline, "sdxl": tiny_sdxl_pipeline}
CONCEPT = "a red circle"


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)


# ------------------------------------------------------------------------ detection, sizes


def test_family_and_prediction_type_are_detected_from_the_pipeline():
    assert model_family(tiny_sd_pipeline()) == "sd1"
    assert model_family(tiny_sd2_pipeline()) == "sd2"
    assert model_family(tiny_sdxl_pipeline()) == "sdxl"
    assert prediction_type(tiny_sd2_pipeline(v_prediction=True)) == "v_prediction"
    assert prediction_type(tiny_sd2_pipeline(v_prediction=False)) == "epsilon"


@pytest.mark.parametrize(("family", "pixels"), [("sd1", 512), ("sd2", 512), ("sd2-v", 768), ("sdxl", 1024)])
def test_default_resolution_comes_from_each_familys_config(family, pixels):
    """No hard-coded sizes: UNet sample_size × the VAE's downsampling factor of the shipped configs."""
    unet = json.loads((compvis.CONFIGS / family / "unet" / "config.json").read_text())
    vae = json.loads((compvis.CONFIGS / family / "vae" / "config.json").read_text())
    stub = type("Pipe", (), {"unet": type("U", (), {"config": type("C", (), unet)})(),
                             "vae_scale_factor": 2 ** (len(vae["block_out_channels"]) - 1)})()
    assert default_image_size(stub) == pixels


# ----------------------------------------------------------------------- v-prediction target


def _alpha_sigma(scheduler, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    return abar.sqrt(), (1 - abar).sqrt()


def test_v_target_equals_the_epsilon_target_converted_to_v(tmp_path):
    """Eq. 5 on v outputs = Eq. 5 built in ε-space and converted to v, for the same x_t and t."""
    pipe = tiny_sd2_pipeline(v_prediction=True)
    cfg = EraseConfig(concept=CONCEPT, eta=1.7, ddim_steps=6, device="cpu", output=str(tmp_path))
    params = select_parameters(pipe.unet, "xattn")
    reference = copied_denoiser(pipe.unet)  # the untouched model, as an independent ε*
    frozen = swapped_denoiser(pipe.unet, original_values(params))
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p) * 0.1)  # mid-training: trained and frozen models differ
    conds = {p: encode_prompt(pipe, p) for p in ("", CONCEPT)}
    scheduler = ddim_scheduler(pipe.scheduler.config, cfg.ddim_steps)
    ex = draw_example(cfg, conds, unet_denoiser(pipe.unet), frozen, scheduler, (1, 4, 8, 8), Slot.seeded(3))

    alpha, sigma = _alpha_sigma(scheduler, ex.t)
    x = ex.x_t
    v_null, v_concept = reference(x, ex.t, conds[""]), reference(x, ex.t, conds[CONCEPT])
    # x_t = α x0 + σ ε and v = α ε − σ x0  =>  ε = α v + σ x_t
    eps_null, eps_concept = alpha * v_null + sigma * x, alpha * v_concept + sigma * x
    eps_target = eps_null - cfg.eta * (eps_concept - eps_null)  # Eq. 5 in ε-space
    x0_target = (x - sigma * eps_target) / alpha
    v_target = scheduler.get_velocity(x0_target, eps_target, ex.t)  # diffusers' own v = α ε − σ x0
    assert torch.allclose(v_target, alpha * eps_target - sigma * x0_target, atol=1e-6)
    assert torch.allclose(ex.target, v_target, atol=1e-5)
    assert not torch.allclose(ex.target, eps_target, atol=1e-3)  # the target really is in v-space


def test_eq5_commutes_with_any_affine_change_of_parameterisation():
    """Eq. 5's weights sum to 1 (1 + η − η), so ε → v = (ε − σ x)/α maps targets to targets."""
    torch.manual_seed(0)
    x, e0, ec, ef = (torch.randn(2, 4, 8, 8) for _ in range(4))
    alpha, sigma, eta = 0.6, 0.8, 2.5
    to_v = lambda eps: (eps - sigma * x) / alpha  # noqa: E731  at fixed x_t, v is affine in ε
    from esd.loss import esd_target

    for context in (None, ef):
        in_eps = to_v(esd_target(e0, ec, eta, context))
        in_v = esd_target(to_v(e0), to_v(ec), eta, None if context is None else to_v(context))
        assert torch.allclose(in_eps, in_v, atol=1e-5)


# ------------------------------------------------------- the adapters follow the pipeline's own sampling


@pytest.mark.parametrize("name", list(BUILDERS))
def test_partial_sampling_walks_the_pipelines_own_trajectory(name):
    """Our text conditioning (SDXL: pooled embeds, size ids, zero unconditional) and DDIM loop reproduce
    the latents the pipeline's own `__call__` has after the same number of steps, from the same z_T."""
    pipe = BUILDERS[name]()
    steps, k, guidance, size = 5, 2, 3.0, 64
    z_T = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    seen = []

    def keep(pipeline, i, t, kwargs):
        seen.append(kwargs["latents"].clone())
        return kwargs

    pipe(CONCEPT, num_inference_steps=steps, guidance_scale=guidance, latents=z_T.clone(), height=size, width=size,
         output_type="latent", callback_on_step_end=keep)
    cond, null = encode_prompt(pipe, CONCEPT, size), encode_prompt(pipe, "", size)
    scheduler = ddim_scheduler(pipe.scheduler.config, steps)
    ours = sample_until(unet_denoiser(pipe.unet), scheduler, z_T, cond, null, guidance, k)
    assert torch.allclose(ours, seen[steps - 1 - k - 1], atol=1e-5)  # after N−1−k updates


def test_sdxl_conditioning_has_pooled_text_size_ids_and_a_zero_null():
    pipe = tiny_sdxl_pipeline()
    cond = encode_prompt(pipe, CONCEPT, 96)
    assert cond.added["text_embeds"].shape == (1, pipe.text_encoder_2.config.projection_dim)
    assert cond.added["time_ids"].tolist() == [[96, 96, 0, 0, 96, 96]]  # original size, crop, target size
    assert cond.added["time_ids"].dtype == cond.embeds.dtype
    null = encode_prompt(pipe, "", 96)
    # force_zeros_for_empty_prompt: the pipeline's own unconditional branch is zeros, and so is ε*(x_t, t)'s
    _, negative, _, negative_pooled = pipe.encode_prompt(CONCEPT, device="cpu", do_classifier_free_guidance=True)
    assert torch.equal(null.embeds, negative) and torch.equal(null.added["text_embeds"], negative_pooled)
    assert not null.embeds.any()


# -------------------------------------------------------------------- methods on real layouts


@pytest.fixture(scope="module")
def real_unets():
    """SD1.x, SD2.x and SDXL UNets at full size on the meta device (layout only, no memory)."""
    return {family: compvis.meta_pipeline(compvis.CONFIGS / family).unet for family in ("sd1", "sd2-v", "sdxl")}


def _module_params(unet, predicate) -> set[str]:
    names = set()
    for mod_name, module in unet.named_modules():
        if mod_name and predicate(mod_name, module):
            names |= {f"{mod_name}.{p}" for p, _ in module.named_parameters()}
    return names


def test_sd2_methods_select_what_they_select_on_sd1(real_unets):
    for method in RULES:
        assert trainable_names(real_unets["sd2-v"], method) == trainable_names(real_unets["sd1"], method), method


def test_sdxl_methods_by_module_role(real_unets):
    unet = real_unets["sdxl"]
    everything = {n for n, _ in unet.named_parameters()}
    cross = _module_params(unet, lambda n, m: isinstance(m, Attention) and m.is_cross_attention)
    self_attn = _module_params(unet, lambda n, m: isinstance(m, Attention) and not m.is_cross_attention)
    assert set(trainable_names(unet, "xattn")) == cross
    assert len(cross) == 70 * 5  # SDXL: 2·2 + 2·10 + 10 + 3·10 + 3·2 = 70 transformer blocks
    assert set(trainable_names(unet, "selfattn")) == self_attn and len(self_attn) == 350
    assert len(trainable_names(unet, "x-strict")) == 140
    time_and_head = _module_params(unet, lambda n, m: n in ("time_embedding", "add_embedding", "conv_norm_out",
                                                            "conv_out"))
    assert any(n.startswith("add_embedding.") for n in time_and_head)  # SDXL's pooled-text/size-id embedding
    assert set(trainable_names(unet, "notime")) == everything - time_and_head
    assert set(trainable_names(unet, "noxattn")) == everything - time_and_head - cross
    assert set(trainable_names(unet, "full")) == everything


@pytest.mark.parametrize("method", ["xlayer", "selflayer"])
def test_layer_methods_are_refused_on_sdxl(real_unets, method):
    with pytest.raises(EsdError, match="no counterpart in SDXL"):
        trainable_names(real_unets["sdxl"], method)
    assert trainable_names(real_unets["sd2-v"], method)  # SD2.x shares SD1.x's blocks


def test_group_table_accounts_for_every_parameter(real_unets):
    unet = real_unets["sdxl"]
    rows = {row[0]: row[1:] for row in group_table(unet, trainable_names(unet, "xattn"))}
    assert sum(r[1] for r in rows.values()) == len(list(unet.parameters()))
    assert "other" not in rows
    assert rows["cross-attention (attn2)"][0] == rows["cross-attention (attn2)"][1] == 350
    assert all(r[0] == 0 for g, r in rows.items() if g != "cross-attention (attn2)")
    assert rows["SDXL text/size embedding (add_embedding)"][1] == 4


# ----------------------------------------------------------------------- the CLI end to end


@pytest.mark.parametrize("name", list(BUILDERS))
def test_erase_then_generate_on_each_family(saved, tmp_path, name, capsys):
    model = str(saved(name))
    out = tmp_path / "erased"
    assert main(["erase", "--concept", CONCEPT, "--model", model, "--iterations", "4", "--lr", "5e-3",
                 "--eta", "3", "--ddim-steps", "4", "--device", "cpu", "--grid-steps", "2",
                 "--output", str(out)]) == 0
    family, kind = ("sdxl", "epsilon") if name == "sdxl" else ("sd2", "v_prediction")
    printed = capsys.readouterr()
    assert ("SDXL" if name == "sdxl" else "SD2.x") in printed.out + printed.err  # the adapter is announced
    assert {p.name for p in out.iterdir()} == {"esd.safetensors", "README.md", "recipe.json", "loss.png", "grid.png"}
    with safe_open(str(out / "esd.safetensors"), "pt") as f:
        meta, names = f.metadata(), list(f.keys())
    assert (meta["model_family"], meta["prediction_type"], meta["image_size"]) == (family, kind, "64")
    assert names and all(".attn2." in n for n in names)
    card = (out / "README.md").read_text()
    assert "## What was trained" in card and "| cross-attention (attn2) |" in card and "(all)" in card
    if name == "sdxl":
        assert "| SDXL text/size embedding (add_embedding) | 0 of 4 (none)" in card

    base, erased = tmp_path / "base", tmp_path / "after"
    common = ["--model", model, "--prompt", CONCEPT, "--seed", "5", "--steps", "3", "--device", "cpu"]
    assert main(["generate", *common, "--output", str(base)]) == 0
    assert main(["generate", *common, "--weights", str(out / "esd.safetensors"), "--output", str(erased)]) == 0
    assert _pixels(base / "0_0.png").shape == (64, 64, 3)
    assert np.abs(_pixels(base / "0_0.png") - _pixels(erased / "0_0.png")).mean() > 0.5


def test_sdxl_xlayer_exits_2_with_the_reason(saved, tmp_path, capsys):
    assert main(["erase", "--concept", "x", "--model", str(saved("sdxl")), "--method", "xlayer", "--device", "cpu",
                 "--output", str(tmp_path / "o")]) == 2
    assert "no counterpart in SDXL" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_erase_from_a_compvis_file_and_convert_back(saved, tmp_path):
    """SD2-v: erase straight from a CompVis single file, then write the erased CompVis file."""
    config_dir = saved("sd2-v")
    pipe = tiny_sd2_pipeline()
    original = compvis.diffusers_to_compvis(copy.deepcopy(pipe))
    ckpt = compvis.save_compvis(original, tmp_path / "v2-768-v.safetensors")
    out = tmp_path / "erased"
    assert main(["erase", "--concept", CONCEPT, "--model", str(ckpt), "--config", str(config_dir),
                 "--iterations", "3", "--lr", "1e-2", "--ddim-steps", "3", "--grid-steps", "0", "--device", "cpu",
                 "--output", str(out)]) == 0
    with safe_open(str(out / "esd.safetensors"), "pt") as f:
        assert f.metadata()["prediction_type"] == "v_prediction"
    erased_file = tmp_path / "erased.safetensors"
    assert main(["convert", str(ckpt), str(erased_file), "--weights", str(out / "esd.safetensors"),
                 "--config", str(config_dir)]) == 0
    written = load_file(str(erased_file))
    assert written.keys() == original.keys()
    changed = {k for k in original if not torch.equal(written[k], original[k])}
    assert changed and all(k.startswith(compvis.UNET_PREFIX) and ".attn2." in k for k in changed)
