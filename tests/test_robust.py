"""`esd erase --robust` (AdvUnlearn-style adversarial erasing) and `--train-text-encoder`: the inner attack, the
loss with adversarial prompts, the weights file with a text-encoder delta and every reader of it (generate,
evaluate's applier, the app's, convert to CompVis), and the bad inputs."""

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from esd import compvis
from esd.cli import main
from esd.config import EraseConfig, adversary_modes
from esd.embeddings import encode, slot_ids, token_embedding
from esd.erase import erase
from esd.errors import EsdError
from esd.examples import Example, batch_loss
from esd.loss import esd_loss
from esd.models import encode_prompt
from esd.networks import Cond
from esd.robust import (
    Adversary,
    TextConds,
    attack_example,
    concept_images,
    first_prefix,
    noised,
    placement,
    text_encoder_params,
)
from esd.sampling import ddim_scheduler, ddim_states, unet_denoiser
from esd.selection import select_parameters
from esd.weights import TEXT_ENCODER, applied_weights, apply_esd_weights

FAST = dict(iterations=3, ddim_steps=3, lr=1e-2, grid_steps=0, device="cpu", save_every=0)


def _cfg(out, **kw) -> EraseConfig:
    return EraseConfig(**{"concept": "a red circle", "output": str(out), **FAST, **kw})


def test_text_conds_are_the_pipelines_conditioning_and_follow_the_encoder(tiny_pipe):
    text = TextConds(tiny_pipe, trains=True)
    assert torch.allclose(text["a red circle"].embeds, encode_prompt(tiny_pipe, "a red circle").embeds, atol=1e-6)
    assert not text["a red circle"].embeds.requires_grad and text.grad("a red circle").embeds.requires_grad
    before = text["a red circle"].embeds.clone()
    with torch.no_grad():  # the encoder moves: the cache is stale until cleared
        tiny_pipe.text_encoder.get_parameter("final_layer_norm.bias").add_(1.0)
    assert torch.equal(text["a red circle"].embeds, before)
    text.clear()
    assert not torch.allclose(text["a red circle"].embeds, before)


def test_text_encoder_params_are_its_layers_not_its_embeddings(tiny_pipe):
    params = text_encoder_params(tiny_pipe.text_encoder)
    assert params and all(n.startswith(TEXT_ENCODER) and ".embeddings." not in n for n in params)
    assert all(p.requires_grad for p in params.values())
    assert not token_embedding(tiny_pipe.text_encoder).weight.requires_grad
    assert len(params) == sum(1 for n, _ in tiny_pipe.text_encoder.named_parameters() if "embeddings" not in n)


def test_inner_attack_lowers_its_loss_and_leaves_the_models_gradients_alone(tiny_pipe):
    """The search must work on a model being trained (θ requires grad, gradient checkpointing on) without
    putting anything into θ's .grad, which the ESD step owns."""
    unet = tiny_pipe.unet
    params = select_parameters(unet, "xattn")
    unet.enable_gradient_checkpointing()
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    with torch.no_grad():  # a target the model makes for another prompt: reachable by changing the prompt
        target = unet(x_t, t, encoder_hidden_states=encode_prompt(tiny_pipe, "a blue square").embeds).sample
    text = TextConds(tiny_pipe, trains=False)
    start = first_prefix(tiny_pipe.tokenizer, tiny_pipe.text_encoder, 3, torch.Generator().manual_seed(1))
    found, losses = attack_example(text, unet_denoiser(unet), "", "a red circle", x_t, t, target, start, 20, 0.05)
    assert len(losses) == 20 and losses[-1] < 0.8 * losses[0]
    assert found.vectors.shape == start.shape and not torch.equal(found.vectors, start)
    assert found.mask.sum() == 3 and all(p.grad is None for p in params.values())


def test_the_adversary_goes_before_the_prompt_or_in_the_concept_words_place(tiny_pipe):
    assert placement("prefix", "a red circle", "a red {}") == ("", "a red circle")
    assert placement("word", "a red circle", "a red {}") == ("a red", "")
    assert placement("word", "circle, striped", "{}, striped") == ("", ", striped")
    assert placement("word", "circle", "{}") == ("", "")
    before, after = placement("word", "a red circle, striped", "a red {}, striped")
    ids, mask = slot_ids(tiny_pipe.tokenizer, before, 1, after)
    plain, _ = slot_ids(tiny_pipe.tokenizer, "a red circle, striped", 0)
    assert ids.shape == plain.shape and mask.sum() == 1
    assert (ids != plain).nonzero()[:, 1].tolist() == [mask.nonzero()[0, 1].item()]  # only the concept's token


def test_batch_loss_adds_the_adversarial_prompt_at_the_same_x_t_and_target(tiny_pipe):
    text = TextConds(tiny_pipe, trains=False)
    g = torch.Generator().manual_seed(0)
    x_t, target, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300])
    ids, mask = slot_ids(tiny_pipe.tokenizer, "", 2, "a red circle")
    adversary = Adversary(ids, mask, torch.randn(2, 32, generator=g) * 0.1)
    ex = Example("circle", 1, x_t, t, text["a red circle"], target, text="a red circle", adversary=adversary)
    trained = unet_denoiser(tiny_pipe.unet)
    with torch.no_grad():
        got = batch_loss(EraseConfig(concept="circle"), trained, [ex], text)
        plain = esd_loss(trained(x_t, t, ex.prompt), target)
        prefixed = esd_loss(trained(x_t, t, Cond(encode(tiny_pipe.text_encoder, ids, mask, adversary.vectors))), target)
    assert torch.allclose(got, (plain + prefixed) / 2, rtol=1e-5)  # the mean over both rows


def test_batch_loss_trains_the_inversion_adversary_at_its_own_noised_image(tiny_pipe):
    """The inversion adversary's row is Eq. 5 at the bank image's x_t', t' and target, not at the example's."""
    text = TextConds(tiny_pipe, trains=False)
    g = torch.Generator().manual_seed(0)
    x_t, target, x_adv, target_adv = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(4))
    t, t_adv = torch.tensor([300.0]), torch.tensor([800.0])
    ids, mask = slot_ids(tiny_pipe.tokenizer, "a red", 1, "")
    adversary = Adversary(ids, mask, torch.randn(1, 32, generator=g) * 0.1, x_adv, t_adv, target_adv)
    ex = Example("circle", 1, x_t, t, text["a red circle"], target, text="a red circle", adversary=adversary)
    trained = unet_denoiser(tiny_pipe.unet)
    with torch.no_grad():
        got = batch_loss(EraseConfig(concept="circle"), trained, [ex], text)
        plain = esd_loss(trained(x_t, t, ex.prompt), target)
        cond = Cond(encode(tiny_pipe.text_encoder, ids, mask, adversary.vectors))
        inverted = esd_loss(trained(x_adv, t_adv, cond), target_adv)
        at_example = esd_loss(trained(x_t, t, cond), target)
    assert torch.allclose(got, (plain + inverted) / 2, rtol=1e-5)
    assert not torch.allclose(got, (plain + at_example) / 2, rtol=1e-3)


def test_the_image_bank_is_the_frozen_models_samples_and_noised_as_for_training(tiny_pipe):
    frozen = unet_denoiser(tiny_pipe.unet)
    scheduler = ddim_scheduler(tiny_pipe.scheduler, 3)
    prompts = [encode_prompt(tiny_pipe, p) for p in ("a red circle", "circle")]
    null = encode_prompt(tiny_pipe, "")
    bank = concept_images(frozen, scheduler, prompts, null, (1, 4, 8, 8), 3.0, seed=5)
    again = concept_images(frozen, scheduler, prompts, null, (1, 4, 8, 8), 3.0, seed=5)
    assert bank.shape == (2, 4, 8, 8) and torch.equal(bank, again)  # the same bank on resume
    z_T = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    *_, last = ddim_states(frozen, scheduler, z_T, Cond.cat(*prompts), null, 3.0)
    assert torch.allclose(bank, last)
    x_t, t, truth = noised(scheduler, bank[:1], torch.Generator().manual_seed(0), (0, 1000))
    g = torch.Generator().manual_seed(0)  # t uniform over the whole schedule (the default), then the noise
    step, noise = torch.randint(1000, (1,), generator=g), torch.randn((1, 4, 8, 8), generator=g)
    assert t.dtype == torch.float32 and t.item() == step.item() and torch.equal(truth, noise)  # ε-prediction
    assert all(700 <= noised(scheduler, bank[:1], g, (700, 1000))[1].item() < 1000 for _ in range(50))
    a = scheduler.alphas_cumprod[step.item()]
    assert torch.allclose(x_t, a.sqrt() * bank[:1] + (1 - a).sqrt() * noise, atol=1e-5)


def test_adversary_kinds_take_turns_and_unknown_kinds_fail_at_parsing(capsys, tmp_path):
    assert adversary_modes("both") == ("prefix", "word")
    assert adversary_modes("prefix+inversion") == ("prefix", "inversion")
    assert adversary_modes("prefix+inversion+inversion") == ("prefix", "inversion", "inversion")
    with pytest.raises(EsdError, match="'inverse' is not a kind.*prefix, word, inversion"):
        EraseConfig(concept="circle", robust_adversary="prefix+inverse").validate()
    with pytest.raises(SystemExit) as exit_:
        main(["erase", "--concept", "circle", "--robust-adversary", "prefix+inverse", "--output", str(tmp_path)])
    assert exit_.value.code == 2 and "'inverse' is not a kind" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_inversion_adversary_erase_fits_its_word_to_the_bank_and_writes_the_unet_tensors(tiny_pipe, tmp_path):
    from esd.adversary import image_bank
    from esd.prepare import setup

    cfg = _cfg(tmp_path / "inv", robust=True, robust_steps=2, robust_adversary="inversion", robust_images=3,
               contexts=["{}", "a {}"], retain=["a blue square"])
    s = setup(cfg, copy.deepcopy(tiny_pipe), progress=False)
    bank = image_bank(s)
    assert [(w, c) for w, c, _ in bank] == [("a red circle", "{}"), ("a red circle", "a {}"), ("a red circle", "{}")]
    assert all(x.shape == (1, 4, 8, 8) for _, _, x in bank)
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(bank, image_bank(s), strict=True))
    result = erase(cfg, pipe=copy.deepcopy(tiny_pipe), progress=False)
    written = load_file(str(tmp_path / "inv" / "esd.safetensors"))
    assert set(written) == set(result.trained) and all(torch.isfinite(v).all() for v in written.values())
    assert "`--robust` (inversion): one word embedding, 2 attack steps (lr 0.01) every 1 iteration(s), 3 images" \
        in (tmp_path / "inv" / "README.md").read_text()


def test_robust_erase_writes_exactly_the_selected_unet_tensors(tiny_pipe, tmp_path):
    pipe = copy.deepcopy(tiny_pipe)
    result = erase(_cfg(tmp_path / "out", robust=True, robust_steps=2, retain=["a blue square"]), pipe=pipe,
                   progress=False)
    written = load_file(str(tmp_path / "out" / "esd.safetensors"))
    assert set(written) == set(select_parameters(copy.deepcopy(tiny_pipe).unet, "xattn")) == set(result.trained)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "`--robust` (prefix+inversion): 5 prefix embeddings or one word embedding, 2 attack steps" in card and "| text encoder | frozen |" in card
    # the run differs from the plain erase (the adversarial rows moved θ), both finite
    plain = copy.deepcopy(tiny_pipe)
    erase(_cfg(tmp_path / "plain", retain=["a blue square"]), pipe=plain, progress=False)
    other = load_file(str(tmp_path / "plain" / "esd.safetensors"))
    assert any(not torch.equal(written[k], other[k]) for k in written)


@pytest.fixture(scope="module")
def text_erase(tmp_path_factory):
    """A robust erase that trains the text encoder too: (its folder, the weights, the base pipeline)."""
    from esd.tiny import tiny_sd_pipeline

    out = tmp_path_factory.mktemp("robust-te")
    pipe = tiny_sd_pipeline(seed=0)
    erase(_cfg(out, robust=True, robust_steps=2, train_text_encoder=True, retain=["a blue square"]), pipe=pipe,
          progress=False)
    return out, load_file(str(out / "esd.safetensors")), tiny_sd_pipeline(seed=0)


def test_train_text_encoder_writes_the_text_encoder_delta_and_the_card_says_so(text_erase):
    out, written, base = text_erase
    text_names = {TEXT_ENCODER + n for n, _ in base.text_encoder.named_parameters() if "embeddings" not in n}
    unet_names = set(select_parameters(copy.deepcopy(base).unet, "xattn"))
    assert set(written) == text_names | unet_names
    moved = [k for k in text_names if not torch.equal(written[k], base.text_encoder.get_parameter(k[13:]).detach())]
    assert moved  # the encoder was trained
    card = (out / "README.md").read_text()
    assert f"| text encoder | trained: {len(text_names)} tensors" in card
    assert 'k.startswith("text_encoder.")' in card  # the snippet loads both parts


def test_every_reader_applies_the_text_encoder_delta(text_erase, tmp_path):
    out, written, base = text_erase
    pipe = copy.deepcopy(base)
    with applied_weights(pipe, out / "esd.safetensors"):  # the app's and the evaluation's way
        inside = {k: pipe.text_encoder.get_parameter(k[len(TEXT_ENCODER):]).detach().clone()
                  for k in written if k.startswith(TEXT_ENCODER)}
    assert all(torch.equal(v, written[k]) for k, v in inside.items())
    after = dict(pipe.text_encoder.named_parameters())  # and the pipeline's own values after the block
    assert all(torch.equal(p, base.text_encoder.get_parameter(n)) for n, p in after.items())
    with pytest.raises(EsdError, match="text-encoder delta as well"):  # half an erase is refused
        apply_esd_weights(pipe.unet, out / "esd.safetensors")

    # esd generate: the images are those of the whole erase, not of its UNet half
    folder = tmp_path / "base"
    base.save_pretrained(folder)
    args = ["generate", "--model", str(folder), "--prompt", "a red circle", "--steps", "3", "--device", "cpu"]
    assert main([*args, "--weights", str(out / "esd.safetensors"), "--output", str(tmp_path / "full")]) == 0
    unet_only = {k: v for k, v in written.items() if not k.startswith(TEXT_ENCODER)}
    save_file(unet_only, str(tmp_path / "unet-only.safetensors"))
    assert main([*args, "--weights", str(tmp_path / "unet-only.safetensors"), "--output", str(tmp_path / "half")]) == 0
    from PIL import Image

    apply_esd_weights(pipe, out / "esd.safetensors")  # both parts baked into a folder: the same images
    pipe.save_pretrained(tmp_path / "baked")
    args[2] = str(tmp_path / "baked")
    assert main([*args, "--output", str(tmp_path / "baked-images")]) == 0
    full, half, baked = (np.asarray(Image.open(next((tmp_path / d).glob("*.png"))))
                         for d in ("full", "half", "baked-images"))
    assert np.array_equal(full, baked) and not np.array_equal(full, half)


def test_convert_to_compvis_carries_the_text_encoder_delta(text_erase, tmp_path):
    out, written, base = text_erase
    base_file = compvis.save_compvis(compvis.diffusers_to_compvis(base), tmp_path / "base.safetensors")
    folder = tmp_path / "pipe"
    base.save_pretrained(folder)
    erased = compvis.convert(base_file, tmp_path / "erased.safetensors", weights=out / "esd.safetensors",
                             config=folder)
    back = compvis.load_single_file(erased, config=folder)
    for name, value in written.items():
        module, key = (back.text_encoder, name[len(TEXT_ENCODER):]) if name.startswith(TEXT_ENCODER) else (back.unet, name)
        assert torch.equal(module.get_parameter(key).detach(), value), name
    with pytest.raises(EsdError, match="also changes the text encoder"):
        compvis.convert(folder, tmp_path / "unet", weights=out / "esd.safetensors", to="diffusers-unet")


def test_the_text_encoder_gets_its_own_learning_rate(tiny_pipe):
    from esd.erase import parameter_groups

    params = {"down.w": torch.nn.Parameter(torch.zeros(1)), TEXT_ENCODER + "layer.w": torch.nn.Parameter(torch.zeros(1))}
    one = parameter_groups(EraseConfig(concept="c", lr=1e-3), params)
    assert len(one) == 1 and len(one[0]["params"]) == 2
    two = parameter_groups(EraseConfig(concept="c", lr=1e-3, text_encoder_lr=1e-4), params)
    optimizer = torch.optim.Adam(two, lr=1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-4]
    assert optimizer.param_groups[1]["params"][0] is params[TEXT_ENCODER + "layer.w"]


def test_save_compvis_from_a_compvis_base_keeps_the_trained_text_encoder(tmp_path):
    from esd.tiny import tiny_sd_pipeline

    base = tiny_sd_pipeline(seed=0)
    base_file = compvis.save_compvis(compvis.diffusers_to_compvis(base), tmp_path / "base.safetensors")
    base.save_pretrained(tmp_path / "pipe")
    pipe = tiny_sd_pipeline(seed=0)
    erase(_cfg(tmp_path / "out", model=str(base_file), train_text_encoder=True, save_compvis=True), pipe=pipe,
          progress=False)
    written = load_file(str(tmp_path / "out" / "esd.safetensors"))
    back = compvis.load_single_file(tmp_path / "out" / "compvis.safetensors", config=tmp_path / "pipe")
    text = {k[len(TEXT_ENCODER):]: v for k, v in written.items() if k.startswith(TEXT_ENCODER)}
    assert text and all(torch.equal(back.text_encoder.get_parameter(k).detach(), v) for k, v in text.items())


def test_bad_robust_settings_are_refused_before_any_work(saved, tmp_path):
    for kw, message in ((dict(robust_steps=0), "--robust-steps must be >= 1"),
                        (dict(robust_lr=float("nan")), "--robust-lr"),
                        (dict(text_encoder_lr=0.0), "--text-encoder-lr"),
                        (dict(train_text_encoder=True, lora_rank=4), "leave out --lora-rank")):
        with pytest.raises(EsdError, match=message):
            _cfg(tmp_path, **kw).validate()
    from diffusers import DiffusionPipeline

    sdxl = DiffusionPipeline.from_pretrained(saved("sdxl"))
    with pytest.raises(EsdError, match="--robust supports SD1.x/SD2.x"):
        erase(_cfg(tmp_path / "x", robust=True), pipe=sdxl, progress=False)
    assert main(["erase", "--concept", "circle", "--robust-every", "0", "--output", str(tmp_path / "y")]) == 2
