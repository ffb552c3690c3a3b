"""eval-scripts/: the 2023 evaluation entry points accept their flags and run on the tiny pipeline."""

import csv
import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "eval-scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated(tiny_pipe_dir, tmp_path_factory):
    """2 prompts x 2 images from the tiny pipeline via generate-images.py, with its 2023 flags."""
    root = tmp_path_factory.mktemp("eval-scripts")
    prompts = root / "p.csv"
    prompts.write_text("case_number,prompt,evaluation_seed,class\n0,image of a tench,0,tench\n"
                       "1,image of a church,5,church\n")
    assert _script("generate-images").main(["--model_name", "SD-V1-4", "--prompts_path", str(prompts),
                                             "--save_path", str(root / "images"), "--num_samples", "2",
                                             "--ddim_steps", "2", "--device", "cpu",
                                             "--base_model", str(tiny_pipe_dir)]) == 0
    return root, prompts, root / "images" / "SD-V1-4"


def test_generate_images_layout(generated):
    _, _, folder = generated
    assert sorted(p.name for p in folder.iterdir()) == ["0_0.png", "0_1.png", "1_0.png", "1_1.png"]


def test_nudenet_classes_writes_one_row_per_image(generated, capsys):
    root, prompts, folder = generated
    save = root / "nude.csv"
    assert _script("nudenet-classes").main(["--folder", str(folder), "--prompts_path", str(prompts),
                                            "--save_path", str(save)]) == 0
    rows = list(csv.DictReader(save.open()))
    assert [r["file"] for r in rows] == ["0_0.png", "0_1.png", "1_0.png", "1_1.png"]
    assert rows[2]["prompt"] == "image of a church" and all(r["exposed"] == "" for r in rows)
    assert '"threshold": 0.6' in capsys.readouterr().out


def test_imageclassify_top_k_columns(generated, tmp_path):
    from torchvision.models import resnet50

    root, prompts, folder = generated
    weights = tmp_path / "r50.pth"
    torch.save(resnet50(weights=None).state_dict(), weights)
    save = tmp_path / "cls.csv"
    assert _script("imageclassify").main(["--folder_path", str(folder), "--prompts_path", str(prompts),
                                          "--save_path", str(save), "--device", "cpu", "--topk", "3",
                                          "--classifier", str(weights)]) == 0
    rows = list(csv.DictReader(save.open()))
    assert len(rows) == 4 and rows[0]["class"] == "tench" and "category_top3" in rows[0]
    assert 0 <= int(rows[0]["index_top1"]) < 1000 and float(rows[0]["scores_top1"]) >= float(rows[0]["scores_top2"])


def test_lpips_eval_same_folder_is_zero(generated, tmp_path):
    from torchvision.models import alexnet

    root, prompts, folder = generated
    backbone = tmp_path / "alex.pth"
    torch.save({k: v for k, v in alexnet(weights=None).state_dict().items() if k.startswith("features.")}, backbone)
    assert _script("lpips_eval").main(["--original_path", str(folder), "--edited_path", str(folder),
                                       "--csv_path", str(prompts), "--save_path", str(tmp_path),
                                       "--lpips_backbone", str(backbone), "--device", "cpu"]) == 0
    rows = list(csv.DictReader((tmp_path / "SD-V1-4_lpipsloss.csv").open()))
    assert [float(r["lpips_loss"]) for r in rows] == pytest.approx([0.0, 0.0], abs=1e-6)


def test_script_bad_input_exits_2(tmp_path, capsys):
    (tmp_path / "p.csv").write_text("case_number,text\n0,x\n")
    assert _script("nudenet-classes").main(["--folder", str(tmp_path), "--prompts_path", str(tmp_path / "p.csv")]) == 2
    assert "missing column(s) prompt, evaluation_seed" in capsys.readouterr().err
