"""CompVis single files in and out: round trips, real-size key layout, EMA, bad inputs (offline)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from esd import compvis
from esd.cli import main
from esd.compvis import CONFIGS, FAMILIES, UNET_PREFIX, YAML
from esd.errors import EsdError
from esd.tiny import tiny_sd2_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline, tiny_unet

MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _tiny_sd1_deep():
    """SD1.x layout with three levels and two resnets per level (not the tiny default)."""
    pipe = tiny_sd_pipeline(seed=3)
    pipe.unet = tiny_unet(
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    return pipe


BUILDERS = {
    "sd1": tiny_sd_pipeline,
    "sd1-deep": _tiny_sd1_deep,
    "sd2-v": tiny_sd2_pipeline,
    "sdxl-deep": lambda: tiny_sdxl_pipeline(n_blocks=3, layers_per_block=2),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Per layout: (pipeline, its config folder, its CompVis export), built once per module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            pipe = BUILDERS[name]()
            pipe.save_pretrained(root / "pipe")
            path = compvis.save_compvis(compvis.diffusers_to_compvis(pipe), root / "model.safetensors")
            cache[name] = (pipe, root / "pipe", path)
        return cache[name]

    return get


def assert_same_weights(a, b) -> None:
    for name in MODELS:
        if getattr(a, name, None) is None:
            continue
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        different = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not different, f"{name}: {different[:3]}"


def no_stray_files(folder: Path, expected: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == expected


# ------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", list(BUILDERS))
def test_round_trip_is_bit_exact(exported, name):
    pipe, config_dir, path = exported(name)
    back = compvis.load_single_file(path, config=config_dir)
    assert type(back) is type(pipe)
    assert_same_weights(pipe, back)
    assert back.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type


@pytest.mark.parametrize("name", ["sd1-deep", "sd2-v", "sdxl-deep"])
def test_diffusers_own_loader_reads_the_export(exported, name):
    """Independent check: diffusers' from_single_file maps our CompVis names back to the same weights."""
    pipe, config_dir, path = exported(name)
    back = type(pipe).from_single_file(str(path), config=str(config_dir), local_files_only=True)
    assert_same_weights(pipe, back)


def test_export_of_a_loaded_file_reproduces_the_file(exported):
    pipe, config_dir, path = exported("sdxl-deep")
    original = load_file(str(path))
    again = compvis.diffusers_to_compvis(compvis.load_single_file(path, config=config_dir))
    assert again.keys() == original.keys()
    assert all(torch.equal(again[k], original[k]) for k in original)


# ------------------------------------------------------------------------ real-size key layout

PINNED = {
    "sd1": {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "model.diffusion_model.time_embed.0.weight": (1280, 320),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
    },
    "sd2": {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "model.diffusion_model.middle_block.1.proj_out.weight": (1280, 1280),
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight": (320, 1024),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.weight": (4096, 1024),
        "cond_stage_model.model.ln_final.weight": (1024,),
    },
    "sdxl": {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.label_emb.0.2.weight": (1280, 1280),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn1.to_q.weight": (1280, 1280),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight": (768, 768),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
    },
}
# (UNet, VAE, text) key counts of the published files; SD2's text tower lacks the unused 24th layer
# and projection (13 keys) that diffusers drops; SDXL's lacks OpenCLIP's logit_scale.
COUNTS = {"sd1": (686, 248, 197), "sd2": (686, 248, 280), "sdxl": (1680, 248, 586)}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_layout_matches_published_compvis_keys(family):
    layout = compvis.diffusers_to_compvis(compvis.meta_pipeline(CONFIGS / family))  # meta: no memory
    for key, shape in PINNED[family].items():
        assert tuple(layout[key].shape) == shape, key
    n_unet = sum(k.startswith(UNET_PREFIX) for k in layout)
    n_vae = sum(k.startswith("first_stage_model.") for k in layout)
    assert (n_unet, n_vae, len(layout) - n_unet - n_vae) == COUNTS[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_yaml_describes_the_same_models_as_the_shipped_folder(family):
    config_dir, original = compvis.resolve_config(None, CONFIGS / YAML[family], {}, "test")
    assert config_dir == CONFIGS / family
    from_yaml = compvis.diffusers_to_compvis(compvis.meta_pipeline(config_dir, original, {}))
    from_folder = compvis.diffusers_to_compvis(compvis.meta_pipeline(config_dir))
    assert {k: v.shape for k, v in from_yaml.items()} == {k: v.shape for k, v in from_folder.items()}


# ---------------------------------------------------------------------------- family and EMA


def test_detect_family_from_keys_and_name(exported):
    assert compvis.detect_family(load_file(str(exported("sd1")[2]))) == "sd1"
    assert compvis.detect_family(load_file(str(exported("sdxl-deep")[2]))) == "sdxl"
    sd2 = load_file(str(exported("sd2-v")[2]))
    assert compvis.detect_family(sd2, "v2-1_768-ema-pruned.safetensors") == "sd2-v"
    assert compvis.detect_family(sd2, "512-base-ema.ckpt") == "sd2"
    assert compvis.detect_family(sd2, "my-finetune.ckpt") == "sd2-v"  # the documented default


def test_ema_weights_are_used_for_the_unet(exported, tmp_path):
    pipe, config_dir, path = exported("sd1")
    tensors = load_file(str(path))
    ema = {}
    for key in [k for k in tensors if k.startswith(UNET_PREFIX)]:
        ema[compvis.ema_key(key)] = tensors[key] + 1.0
        tensors[key] = torch.zeros_like(tensors[key])  # the raw weights must not be the ones used
    ema["model_ema.decay"] = torch.tensor(0.9999)
    ema["model_ema.num_updates"] = torch.tensor(1000)
    assert "model_ema.diffusion_modelinput_blocks11transformer_blocks0attn2to_kweight" in ema
    torch.save({"state_dict": {**tensors, **ema}}, tmp_path / "full-ema.ckpt")
    unet = compvis.load_single_file(tmp_path / "full-ema.ckpt", config=config_dir, sample_size=16).unet
    assert unet.config.sample_size == 16
    for name, value in unet.state_dict().items():
        assert torch.equal(value, pipe.unet.state_dict()[name] + 1.0), name


def test_partial_ema_is_an_error(exported, tmp_path):
    tensors = load_file(str(exported("sd1")[2]))
    tensors["model_ema.diffusion_modelout2weight"] = tensors["model.diffusion_model.out.2.weight"].clone()
    save_file(tensors, str(tmp_path / "partial.safetensors"))
    with pytest.raises(EsdError, match="partial.safetensors.*not for every UNet tensor"):
        compvis.load_single_file(tmp_path / "partial.safetensors", config=exported("sd1")[1])


# ------------------------------------------------------------------------------- bad inputs


def test_garbage_file(tmp_path):
    (tmp_path / "garbage.ckpt").write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(EsdError, match="garbage.ckpt: neither a PyTorch checkpoint"):
        compvis.read_checkpoint(tmp_path / "garbage.ckpt")


def test_truncated_safetensors(exported, tmp_path):
    data = exported("sd1")[2].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(EsdError, match="cut.safetensors: truncated or corrupt safetensors"):
        compvis.read_checkpoint(tmp_path / "cut.safetensors")


def test_truncated_ckpt(tmp_path):
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.ones(64, 64)}}, tmp_path / "a.ckpt")
    data = (tmp_path / "a.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(EsdError, match="cut.ckpt: truncated or corrupt PyTorch checkpoint"):
        compvis.read_checkpoint(tmp_path / "cut.ckpt")


class _MakesAFolder:
    """Unpickling this would call os.mkdir(marker): proof of code execution if the folder appears."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_with_objects_is_refused_without_running_them(tmp_path):
    marker = tmp_path / "pwned"
    weights = {"model.diffusion_model.out.2.weight": torch.ones(2)}
    torch.save({"state_dict": weights, "payload": _MakesAFolder(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(EsdError, match="evil.ckpt: the pickle holds Python objects other than tensors"):
        compvis.read_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_unknown_keys(tmp_path):
    save_file({"encoder.weight": torch.ones(2), "decoder.weight": torch.ones(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(EsdError, match=r"other.safetensors: not a Stable Diffusion checkpoint.*decoder.weight"):
        compvis.read_checkpoint(tmp_path / "other.safetensors")


def test_config_that_does_not_fit_the_tensors(exported):
    path = exported("sd1")[2]
    with pytest.raises(EsdError, match=r"model.safetensors: does not match the config .*sd1.*shapes differ: "
                       r"model.diffusion_model"):
        compvis.load_single_file(path)  # a tiny file against the real SD1.x config
    with pytest.raises(EsdError, match="model.safetensors: does not match the config .*missing"):
        compvis.load_single_file(path, config=exported("sd1-deep")[1])


# ----------------------------------------------------------------------------------- convert


def _esd_weights(pipe, path: Path) -> dict[str, torch.Tensor]:
    """An ESD weights file: every attn2 parameter, changed, under diffusers names."""
    trained = {k: v + 0.5 for k, v in pipe.unet.state_dict().items() if "attn2" in k}
    save_file(trained, str(path))
    return trained


def test_convert_compvis_to_compvis_keeps_every_other_tensor(exported, tmp_path):
    pipe, config_dir, path = exported("sd2-v")
    base = load_file(str(path))
    base["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)  # a tensor diffusers does not model
    for key in [k for k in base if k.startswith(UNET_PREFIX)]:
        base[compvis.ema_key(key)] = base[key].clone()
    save_file(base, str(tmp_path / "base.safetensors"))
    trained = _esd_weights(pipe, tmp_path / "esd.safetensors")

    out = compvis.convert(tmp_path / "base.safetensors", tmp_path / "erased.ckpt",
                          weights=tmp_path / "esd.safetensors", config=config_dir)
    result = torch.load(out, weights_only=True)["state_dict"]
    assert result.keys() == base.keys()
    names = compvis.unet_key_map(pipe.unet)
    for key, value in result.items():
        diffusers_name = next((d for d, c in names.items() if c == key), None)
        if diffusers_name in trained:
            assert torch.equal(value, trained[diffusers_name])
            assert torch.equal(result[compvis.ema_key(key)], value)  # the EMA copy is erased too
        elif not key.startswith("model_ema."):
            assert torch.equal(value, base[key]), key


def test_convert_diffusers_folder_to_compvis_and_to_unet_folder(exported, tmp_path):
    pipe, config_dir, path = exported("sd1")
    compvis.convert(config_dir, tmp_path / "out.safetensors")
    assert load_file(str(tmp_path / "out.safetensors")).keys() == load_file(str(path)).keys()
    compvis.convert(path, tmp_path / "unet", to="diffusers-unet", config=config_dir)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet"))
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in unet.state_dict().items())


def test_convert_with_mismatched_weights_writes_nothing(exported, tmp_path):
    pipe, config_dir, path = exported("sd1")
    save_file({"down_blocks.0.attentions.0.proj_in.weight": torch.ones(3, 3)}, str(tmp_path / "esd.safetensors"))
    for dst in ("out.safetensors", "out_folder"):
        with pytest.raises(EsdError, match="esd.safetensors"):
            compvis.convert(path, tmp_path / dst, weights=tmp_path / "esd.safetensors", config=config_dir)
    no_stray_files(tmp_path, {"esd.safetensors"})


def test_cli_convert(exported, tmp_path, capsys):
    pipe, config_dir, path = exported("sd1")
    assert main(["convert", str(path), str(tmp_path / "pipe"), "--config", str(config_dir)]) == 0
    assert (tmp_path / "pipe" / "model_index.json").is_file()
    assert f"wrote {tmp_path / 'pipe'}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["convert", str(path), "x", "--to", "onnx"])
    assert main(["convert", str(tmp_path / "missing.ckpt"), str(tmp_path / "o.safetensors")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_sd2_export_from_a_folder_warns_and_from_the_original_file_keeps_its_text_tensors(exported, tmp_path, caplog):
    pipe, config_dir, path = exported("sd2-v")
    with caplog.at_level(logging.WARNING, logger="esd.compvis"):
        compvis.convert(config_dir, tmp_path / "from-folder.safetensors")
    assert "text_projection" in caplog.text and "clip missing" in caplog.text
    # An original SD2 file carries the projection diffusers drops: a conversion from it keeps it, silently.
    prefix = compvis.TEXT_PREFIXES["sd2"]["text_encoder"]
    width = pipe.text_encoder.config.hidden_size
    projection = {f"{prefix}text_projection": torch.randn(width, width)}
    save_file({**load_file(str(path)), **projection}, str(tmp_path / "original.safetensors"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="esd.compvis"):
        compvis.convert(tmp_path / "original.safetensors", tmp_path / "from-file.safetensors", config=config_dir)
    assert "text_projection" not in caplog.text
    written = load_file(str(tmp_path / "from-file.safetensors"))
    assert torch.equal(written[f"{prefix}text_projection"], projection[f"{prefix}text_projection"])
    # the same rule for the export an erase or the app writes (export_pipeline), with and without the base file
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="esd.compvis"):
        compvis.export_pipeline(pipe, tmp_path / "kept.safetensors", base_file=tmp_path / "original.safetensors")
        assert "text_projection" not in caplog.text
        compvis.export_pipeline(pipe, tmp_path / "lost.safetensors")
    assert "text_projection" in caplog.text
    assert f"{prefix}text_projection" in load_file(str(tmp_path / "kept.safetensors"))
