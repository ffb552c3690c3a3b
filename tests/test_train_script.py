"""train-scripts/train-esd.py accepts the 2023 flags and maps them onto EraseConfig."""

import importlib.util
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from esd.config import EraseConfig

SCRIPT = Path(__file__).resolve().parents[1] / "train-scripts" / "train-esd.py"


def _module():
    spec = importlib.util.spec_from_file_location("train_esd", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_2023_flags_map_onto_the_config():
    m = _module()
    args = m.parse_args(["--prompt", "Van Gogh", "--train_method", "noxattn", "--start_guidance", "2",
                         "--negative_guidance", "1.5", "--iterations", "200", "--lr", "2e-5", "--devices", "0,1",
                         "--seperator", ";", "--image_size", "256", "--ddim_steps", "25", "--ckpt_path", "x.ckpt",
                         "--config_path", "v1.yaml", "--diffusers_config_path", "unet.json"])
    cfg = m.to_config(args)
    assert cfg == EraseConfig(concept="Van Gogh", method="noxattn", start_guidance=2.0, eta=1.5, iterations=200,
                              lr=2e-5, model="x.ckpt", config="v1.yaml", separator=";", image_size=256, ddim_steps=25,
                              devices="0,1", output=cfg.output, recipe="paper")
    # under outputs/ (ignored by git), not inside the checkout's models/; the paper's recipe, whatever the folder's
    assert cfg.output == "outputs/compvis-word_vangogh-method_noxattn-sg_2.0-ng_1.5-iter_200-lr_2e-05"
    same = m.to_config(m.parse_args(["--prompt", "x", "--train_method", "xattn", "--devices", "0,0"]))
    assert same.devices is None and same.device == "0"  # the old default 0,0 means one device: one UNet


def test_script_runs_end_to_end(tiny_pipe_dir, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(SCRIPT), "--prompt", "a red circle", "--train_method", "xattn",
                        "--iterations", "2", "--ddim_steps", "3", "--ckpt_path", str(tiny_pipe_dir), "--devices",
                        "cpu,cpu", "--output", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    with safe_open(str(out / "esd.safetensors"), "pt") as f:
        assert EraseConfig.from_json(f.metadata()["esd_config"]).iterations == 2
    bad = subprocess.run([sys.executable, str(SCRIPT), "--prompt", "x", "--train_method", "xatn"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_script_on_a_compvis_checkpoint_writes_compvis_file_and_diffusers_unet(tiny_pipe, tiny_pipe_dir, tmp_path):
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from esd.compvis import export_pipeline, read_checkpoint, unet_key_map

    ckpt = export_pipeline(tiny_pipe, tmp_path / "tiny.ckpt")  # a pickled CompVis checkpoint
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(SCRIPT), "--prompt", "a red circle", "--train_method", "xattn",
                        "--iterations", "2", "--ddim_steps", "3", "--lr", "1e-2", "--ckpt_path", str(ckpt),
                        "--config_path", str(tiny_pipe_dir), "--devices", "cpu,cpu", "--output", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    erased = load_file(str(out / "esd.safetensors"))
    before, after = read_checkpoint(ckpt), read_checkpoint(out / "compvis.ckpt")
    assert set(after) == set(before)  # every tensor of the original is there
    to_compvis = unet_key_map(tiny_pipe.unet)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {to_compvis[name] for name in erased}  # exactly the erased UNet tensors differ
    for name, value in erased.items():
        assert torch.equal(after[to_compvis[name]], value)
    unet = UNet2DConditionModel.from_pretrained(out / "diffusers-unet")
    for name, value in erased.items():
        assert torch.equal(unet.get_parameter(name).detach(), value)
