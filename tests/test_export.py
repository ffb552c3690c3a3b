"""An erase as a LoRA file other clients read: kohya's layout, and a LoRA extracted from a weight erase.

Each test erases a tiny SD-architecture pipeline with `esd erase`, converts with `esd convert`, and loads the
result with diffusers' own `load_lora_weights` (which converts kohya files itself), comparing the merged
weights with what `esd generate` applies.
"""

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from esd import lowrank
from esd.cli import main
from esd.networks import network

ERASE = ["--concept", "a red circle", "--iterations", "3", "--ddim-steps", "4", "--image-size", "64",
         "--grid-steps", "0", "--lr", "1e-2", "--device", "cpu"]


def _model(family, saved, tiny_pipe_dir):
    return tiny_pipe_dir if family == "sd1" else saved(family)


def _erase(model, out, *extra) -> None:
    assert main(["erase", "--model", str(model), *ERASE, "--output", str(out), *extra]) == 0


def _weights_applied(model, weights):
    from esd.models import load_pipeline
    from esd.weights import apply_esd_weights

    pipe = load_pipeline(str(model))
    apply_esd_weights(pipe, weights)
    return dict(network(pipe).named_parameters())


def _diffusers_fused(model, lora_file):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model))
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe


@pytest.mark.parametrize("family,version", [("sd1", "sd_v1"), ("sd2-v", "sd_v2"), ("sdxl", "sdxl_base_v1-0")])
def test_kohya_export_of_an_esd_u_lora_loads_in_diffusers_with_our_merged_weights(
        tmp_path, saved, tiny_pipe_dir, family, version):
    """ESD-u adapts convolutions and linear layers alike; every one must arrive in the client as ours."""
    model = _model(family, saved, tiny_pipe_dir)
    _erase(model, tmp_path / "out", "--method", "noxattn", "--lora-rank", "2")
    weights, kohya_file = tmp_path / "out" / "esd.safetensors", tmp_path / "kohya" / "erase.safetensors"
    assert main(["convert", str(weights), "--to", "kohya", str(kohya_file)]) == 0

    tensors = load_file(str(kohya_file))
    with safe_open(str(kohya_file), "pt") as f:
        header = f.metadata()
    assert header["ss_network_dim"] == "2" and header["ss_network_alpha"] == "2.0"
    assert header["ss_base_model_version"] == version and header["ss_network_module"] == "networks.lora"
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in tensors)
    assert any(t.dim() == 4 for k, t in tensors.items() if k.endswith("lora_down.weight"))  # conv layers too
    assert len(tensors) == 3 * len(load_file(str(weights))) // 2

    ours = _weights_applied(model, weights)
    theirs = dict(network(_diffusers_fused(model, kohya_file)).named_parameters())
    assert set(ours) == set(theirs)
    for name, value in ours.items():
        torch.testing.assert_close(theirs[name], value, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("method", ["xattn", "noxattn"])
def test_lora_extracted_at_full_rank_reproduces_a_weight_erase_and_reports_lower_ranks(
        tmp_path, tiny_pipe_dir, capsys, method):
    _erase(tiny_pipe_dir, tmp_path / "out", "--method", method)
    weights = tmp_path / "out" / "esd.safetensors"
    erased = load_file(str(weights))
    full = max(lowrank.max_rank(t.shape) for t in erased.values() if t.dim() in (2, 4))
    for layout in ("lora", "kohya"):
        dst = tmp_path / layout / "extracted.safetensors"
        assert main(["convert", str(weights), "--to", layout, str(dst), "--extract-lora", str(full)]) == 0
        printed = capsys.readouterr().out
        assert f"rank {full}: relative error 0.00% of the change" in printed
        errors = dict(part.split(": ") for part in printed.split("at other ranks: ")[1].splitlines()[0].split(", "))
        assert float(errors["1"].rstrip("%")) > 1.0  # rank 1 loses part of the change, and says so
        first = next(r for r, e in errors.items() if float(e.rstrip("%")) <= 20)
        assert f"recommended: rank {first} or more (error <= 20%)" in printed
        fused = dict(network(_diffusers_fused(tiny_pipe_dir, dst)).named_parameters())
        for name, value in erased.items():
            if value.dim() in (2, 4):
                torch.testing.assert_close(fused[name], value, rtol=0, atol=1e-4, msg=name)
            if method == "xattn" and value.dim() == 1:
                assert "left out (no LoRA holds them)" in printed  # e.g. to_out.0.bias: not a LoRA


def test_extraction_error_is_the_svd_tail():
    """rank_error is ‖Δ − Δ_r‖/‖Δ‖ of the truncation `truncated` returns, for linear and conv layers."""
    torch.manual_seed(0)
    for shape in ((6, 5), (4, 3, 3, 3)):
        delta = torch.randn(shape, dtype=torch.float64)
        factors = lowrank.svd(delta)
        s = factors[1]
        for rank in range(1, lowrank.max_rank(shape) + 1):
            down, up = lowrank.truncated(factors, rank, delta.shape, delta.dtype)
            assert down.shape[0] == up.shape[1] == rank
            err = float((lowrank.product(down, up) - delta).norm() / delta.norm())
            assert math.isclose(err, lowrank.rank_error(s, rank), rel_tol=1e-9, abs_tol=1e-12)
        assert lowrank.rank_error(s, lowrank.max_rank(shape)) == 0.0


def test_half_precision_share_of_a_change():
    base = {"w": torch.ones(100)}
    small = {"w": torch.ones(100) + 1e-4}  # below half precision's spacing at 1.0: rounded away
    large = {"w": torch.ones(100) + 0.25}  # exactly representable
    assert lowrank.kept_in(base, small, torch.bfloat16) == (0.0, pytest.approx(1.0))
    assert lowrank.kept_in(base, small, torch.float16) == (0.0, pytest.approx(1.0))
    assert lowrank.kept_in(base, small, torch.float32)[0] == pytest.approx(1.0, abs=1e-3)
    assert lowrank.kept_in(base, large, torch.bfloat16) == (1.0, 0.0)
    assert lowrank.kept_in(base, base, torch.bfloat16) == (1.0, 0.0)  # no change: nothing to lose


def _fail(args, capsys) -> str:
    assert main(["convert", *args]) == 2
    return capsys.readouterr().err


def test_bad_input_exits_2_naming_the_fix_and_writes_nothing(tmp_path, tiny_pipe_dir, saved, capsys):
    _erase(tiny_pipe_dir, tmp_path / "weights")
    _erase(saved("flux"), tmp_path / "flux", "--lora-rank", "2")
    weights, dst = tmp_path / "weights" / "esd.safetensors", tmp_path / "x.safetensors"

    assert "add --extract-lora R" in _fail([str(weights), "--to", "kohya", str(dst)], capsys)
    assert "--to lora" in _fail([str(tmp_path / "flux" / "esd.safetensors"), "--to", "kohya", str(dst)], capsys)
    err = _fail([str(weights), "--to", "kohya", str(dst), "--extract-lora", "100000"], capsys)
    assert "larger than every layer allows" in err and "--extract-lora 64" in err
    assert "--extract-lora must be >= 1" in _fail([str(weights), "--to", "lora", str(dst), "--extract-lora", "0"],
                                                  capsys)
    assert "add --to" in _fail([str(weights), str(dst), "--extract-lora", "2"], capsys)

    tensors = load_file(str(weights))
    tensors[next(iter(tensors))][0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"))
    assert "NaN" in _fail([str(tmp_path / "nan.safetensors"), "--to", "lora", str(dst), "--extract-lora", "2"], capsys)
    lora_run = tmp_path / "lora"
    _erase(tiny_pipe_dir, lora_run, "--lora-rank", "2")
    assert "already a LoRA" in _fail([str(lora_run / "esd.safetensors"), "--to", "kohya", str(dst),
                                      "--extract-lora", "2"], capsys)
    assert "another model" in _fail([str(weights), "--to", "lora", str(dst), "--extract-lora", "2", "--model",
                                     str(saved("sdxl"))], capsys)
    assert not dst.exists() and not list(tmp_path.glob(".x.safetensors*"))


def test_padding_a_narrow_layer_keeps_its_update():
    torch.manual_seed(1)
    for shape in ((3, 5), (2, 3, 3, 3)):
        delta = torch.randn(shape, dtype=torch.float64)
        down, up = lowrank.padded(*lowrank.truncated(lowrank.svd(delta), lowrank.max_rank(shape), shape, delta.dtype), 8)
        assert down.shape[0] == up.shape[1] == 8
        torch.testing.assert_close(lowrank.product(down, up), delta)


def test_save_kohya_writes_the_lora_beside_the_weights_and_the_card_says_what_half_precision_keeps(
        tmp_path, tiny_pipe_dir, capsys):
    _erase(tiny_pipe_dir, tmp_path / "lora", "--lora-rank", "2", "--save-kohya")
    kohya_file = tmp_path / "lora" / "esd-kohya.safetensors"
    assert sorted(load_file(str(kohya_file))) == sorted(
        f"lora_unet_{m.removeprefix('unet.').replace('.', '_')}.{leaf}"
        for m in {k.rsplit(".lora_", 1)[0] for k in load_file(str(tmp_path / "lora" / "esd.safetensors"))}
        for leaf in ("alpha", "lora_down.weight", "lora_up.weight"))
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "`esd-kohya.safetensors` (AUTOMATIC1111/Forge" in card and "<lora:esd-kohya:1>" in card

    _erase(tiny_pipe_dir, tmp_path / "weights")  # a weight erase: the card gives the share kept in fp16 and bf16
    card = (tmp_path / "weights" / "README.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| in half precision |"))
    assert "a copy in fp16 keeps" in row and "a copy in bf16 keeps" in row
    assert main(["erase", "--model", str(tiny_pipe_dir), *ERASE, "--output", str(tmp_path / "x"), "--save-kohya"]) == 2
    assert "add --lora-rank R" in capsys.readouterr().err


def test_a_half_precision_compvis_file_reports_the_share_of_the_erase_it_keeps(tmp_path, tiny_pipe_dir, capsys):
    """A 1-iteration erase at a tiny lr is a change far below fp16's spacing: the file keeps almost none of it."""
    base16 = tmp_path / "base16.safetensors"
    assert main(["convert", str(tiny_pipe_dir), str(tmp_path / "base32.safetensors")]) == 0
    state = load_file(str(tmp_path / "base32.safetensors"))
    save_file({k: v.half() for k, v in state.items()}, str(base16))
    config = ["--config", str(tiny_pipe_dir)]  # a tiny model's CompVis file: its shapes are not SD1's
    assert main(["erase", "--model", str(base16), *config, *ERASE, "--lr", "1e-7", "--iterations", "1",
                 "--output", str(tmp_path / "small")]) == 0
    capsys.readouterr()
    assert main(["convert", str(base16), str(tmp_path / "erased16.safetensors"), *config, "--weights",
                 str(tmp_path / "small" / "esd.safetensors")]) == 0
    out = capsys.readouterr()
    kept = float(out.out.split("which keeps ")[1].split("%")[0])
    assert kept < 50 and "most of the erase is rounded away in float16" in out.err
