"""`esd evaluate`: each suite end to end on the tiny pipeline with local stand-ins of the scoring models,
NudeNet for real, the counting rule pinned, resume and re-run, and every bad input with exit code 2."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from esd.cli import main
from esd.evaluate import command
from esd.evaluate.nudity import count_exposed

STEPS = ["--steps", "2", "--device", "cpu"]


def _csv(path: Path, rows: list[list], header=("case_number", "prompt", "evaluation_seed")) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A transformers CLIPModel with random weights and CLIP's real vocabulary size (no tokenizer files:
    the shipped tokenizer is the fallback)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    layer = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(text_config={**layer, "vocab_size": 49408, "max_position_embeddings": 77},
                        vision_config={**layer, "image_size": 32, "patch_size": 8}, projection_dim=16)
    path = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------ nudity


def test_counting_rule_pinned_with_stubbed_detections():
    det = [
        [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.9, "box": [0, 0, 1, 1]},
         {"class": "FEMALE_BREAST_EXPOSED", "score": 0.7, "box": [2, 0, 1, 1]},  # same class twice: counts once
         {"class": "FEET_EXPOSED", "score": 0.6, "box": [0, 0, 1, 1]}],  # exactly the threshold: counts
        [{"class": "BELLY_EXPOSED", "score": 0.59, "box": [0, 0, 1, 1]},  # below the threshold
         {"class": "FACE_FEMALE", "score": 0.99, "box": [0, 0, 1, 1]},  # not an EXPOSED class
         {"class": "BUTTOCKS_COVERED", "score": 0.99, "box": [0, 0, 1, 1]}],
        [],
        [{"class": "FEET_EXPOSED", "score": 0.8, "box": [0, 0, 1, 1]}],
    ]
    counts = count_exposed(det, threshold=0.6)
    assert counts["per_class"]["FEMALE_BREAST_EXPOSED"] == 1 and counts["per_class"]["FEET_EXPOSED"] == 2
    assert counts["per_class"]["BELLY_EXPOSED"] == 0 and "FACE_FEMALE" not in counts["per_class"]
    assert (counts["total"], counts["images_with_exposed"], counts["share_any"]) == (3, 2, 0.5)
    assert counts["per_image"] == [["FEET_EXPOSED", "FEMALE_BREAST_EXPOSED"], [], [], ["FEET_EXPOSED"]]
    assert count_exposed(det, threshold=0.5)["per_class"]["BELLY_EXPOSED"] == 1


def test_nudenet_runs_for_real_on_a_photo_and_a_generated_image(tiny_pipe, tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    from esd.evaluate.nudity import detect_all, exposed_in_image

    photo = Path(skimage_data.__file__).parent / "astronaut.png"  # a dressed astronaut: faces, no nudity
    generated = tmp_path / "gen.png"
    tiny_pipe(prompt="a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0].save(generated)
    per_image = detect_all([photo, generated])
    assert {d["class"] for d in per_image[0]} & {"FACE_FEMALE", "FACE_MALE"}  # the detector really ran
    assert exposed_in_image(per_image[0]) == set() and exposed_in_image(per_image[1]) == set()


def test_nudity_suite_with_reference_then_rerun_and_resume(tiny_pipe_dir, tmp_path, monkeypatch):
    prompts = _csv(tmp_path / "p.csv", [[7, "a red circle", 3], [8, "a blue square", 5]])
    out = tmp_path / "eval"
    args = ["evaluate", "--suite", "nudity", "--model", str(tiny_pipe_dir), "--reference-model", str(tiny_pipe_dir),
            "--prompts", str(prompts), "--num-images", "2", "--threshold", "0.5", "--output", str(out), *STEPS]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"]["threshold"] == 0.5 and metrics["protocol"]["n_prompts"] == 2
    assert metrics["results"]["model"]["n_images"] == 4 and metrics["results"]["model"]["total"] == 0
    assert metrics["versions"]["nudenet"].startswith("3.4")
    assert metrics["models"]["model"]["model_sha256"]  # the weight files of the model folder, hashed
    assert sorted(p.name for p in (out / "images" / "model").iterdir()) == ["7_0.png", "7_1.png", "8_0.png", "8_1.png",
                                                                            "manifest.json"]
    manifest = json.loads((out / "images" / "model" / "manifest.json").read_text())
    assert {(r["file"], r["seed"]) for r in manifest["images"]} == {("7_0.png", 3), ("7_1.png", 4), ("8_0.png", 5),
                                                                    ("8_1.png", 6)}
    report = (out / "report.md").read_text()
    assert "FEMALE_BREAST_EXPOSED" in report and "| share of images with any exposed class | 0 | 0 |" in report
    assert "side_by_side.png" in report and "0.5" in report
    assert "<table>" in (out / "report.html").read_text() and (out / "side_by_side.png").is_file()
    # identical models, identical seeds: identical images (the comparison is fair)
    assert np.array_equal(np.asarray(Image.open(out / "images/model/7_1.png")),
                          np.asarray(Image.open(out / "images/reference/7_1.png")))

    # re-run: every image is on disk, so the diffusion model is not even loaded
    def no_loading(*a, **k):
        raise AssertionError("the pipeline was loaded although every image exists")

    monkeypatch.setattr(command, "load_pipeline", no_loading)
    assert main(args) == 0
    monkeypatch.undo()

    # resume: only the missing image is generated, the others are left untouched
    kept = out / "images" / "model" / "7_0.png"
    before = kept.stat().st_mtime_ns
    (out / "images" / "model" / "8_1.png").unlink()
    assert main(args) == 0
    assert (out / "images" / "model" / "8_1.png").is_file() and kept.stat().st_mtime_ns == before


def test_reused_folder_with_other_settings_or_unreadable_image_is_refused(tiny_pipe_dir, tmp_path, capsys):
    prompts = _csv(tmp_path / "p.csv", [[0, "a red circle", 0]])
    out = tmp_path / "eval"
    base = ["evaluate", "--suite", "nudity", "--model", str(tiny_pipe_dir), "--prompts", str(prompts),
            "--output", str(out), "--device", "cpu"]
    assert main([*base, "--steps", "2"]) == 0
    assert main([*base, "--steps", "3"]) == 2
    assert "steps: 2 -> 3" in capsys.readouterr().err
    (out / "metrics.json").unlink()
    (out / "images" / "model" / "0_0.png").write_bytes(b"not a png")
    assert main([*base, "--steps", "2"]) == 2
    assert "0_0.png: not a readable image" in capsys.readouterr().err
    assert not (out / "metrics.json").exists()


def test_weights_are_applied_hashed_and_pinned_to_the_folder(tiny_pipe_dir, tmp_path, capsys):
    from esd.evaluate.provenance import sha256_file
    from esd.tiny import tiny_sd_pipeline
    from esd.weights import save_esd_weights

    unet = tiny_sd_pipeline(seed=0).unet
    files = []
    for i in (1, 2):
        torch.manual_seed(i)
        tensors = {n: p + 0.5 * torch.randn_like(p) for n, p in unet.named_parameters() if ".attn2." in n}
        files.append(save_esd_weights(tmp_path / f"w{i}.safetensors", tensors, {"step": "1"}))
    prompts = _csv(tmp_path / "p.csv", [[0, "a red circle", 0]])
    out = tmp_path / "eval"
    base = ["evaluate", "--suite", "nudity", "--model", str(tiny_pipe_dir), "--reference-model", str(tiny_pipe_dir),
            "--prompts", str(prompts), "--output", str(out), *STEPS]
    assert main([*base, "--weights", str(files[0])]) == 0
    models = json.loads((out / "metrics.json").read_text())["models"]
    assert models["model"]["weights_sha256"] == sha256_file(files[0]) and models["reference"]["weights"] is None
    erased = np.asarray(Image.open(out / "images/model/0_0.png"), dtype=np.float32)
    original = np.asarray(Image.open(out / "images/reference/0_0.png"), dtype=np.float32)
    assert np.abs(erased - original).mean() > 1.0  # the weights really changed the model's images
    assert main([*base, "--weights", str(files[1])]) == 2
    assert "weights_sha256" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- imagenette


def test_imagenette_suite_with_a_local_resnet50(tiny_pipe_dir, tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(0)
    weights = tmp_path / "resnet50.pth"
    torch.save(resnet50(weights=None).state_dict(), weights)
    out = tmp_path / "eval"
    assert main(["evaluate", "--suite", "imagenette", "--model", str(tiny_pipe_dir), "--classifier", str(weights),
                 "--limit", "2", "--num-images", "1", "--erased", "TENCH", "--output", str(out), *STEPS]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    res = metrics["results"]["model"]
    assert set(res["per_class"]) == {"tench", "English springer"} and metrics["protocol"]["erased"] == "tench"
    assert res["erased"] == res["per_class"]["tench"] and res["others"] == res["per_class"]["English springer"]
    assert all(len(top5) == 5 for top5 in res["per_image"].values())
    assert "erased (tench)" in (out / "report.md").read_text()
    rows = list(csv.DictReader((out / "prompts.csv").open()))
    assert [r["class"] for r in rows] == ["tench", "English springer"]


def test_classifier_errors_name_the_model_and_the_flag(tmp_path, monkeypatch):
    import torchvision

    from esd.errors import EsdError
    from esd.evaluate.classify import load_resnet50

    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(EsdError, match="--classifier .*bad.pth: not a torchvision ResNet-50"):
        load_resnet50(bad)

    def offline(**kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.models, "resnet50", offline)
    with pytest.raises(EsdError, match="ResNet-50 IMAGENET1K_V2.*--classifier PATH"):
        load_resnet50(None)


# ----------------------------------------------------------------------------------------- artists


def test_artists_suite_clip_identification_and_lpips(tiny_pipe_dir, tiny_clip_dir, tmp_path):
    from torchvision.models import alexnet

    torch.manual_seed(0)
    backbone = tmp_path / "alexnet.pth"
    torch.save({k: v for k, v in alexnet(weights=None).state_dict().items() if k.startswith("features.")}, backbone)
    prompts = _csv(tmp_path / "a.csv", [[0, "a lake by Van Gogh", 1, "Van Gogh"], [1, "a lake by Kilian Eng", 1, "Kilian Eng"]],
                   header=("case_number", "prompt", "evaluation_seed", "artist"))
    out = tmp_path / "eval"
    assert main(["evaluate", "--suite", "artists", "--model", str(tiny_pipe_dir), "--reference-model", str(tiny_pipe_dir),
                 "--prompts", str(prompts), "--num-images", "1", "--erased", "van gogh", "--clip-model", str(tiny_clip_dir),
                 "--lpips-backbone", str(backbone), "--output", str(out), *STEPS]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["results"]["model"]["per_image"].values()) <= {"Van Gogh", "Kilian Eng"}
    # the same model twice: LPIPS between the two image sets is zero
    assert metrics["comparison"]["lpips_mean"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["comparison"]["lpips_erased"] == pytest.approx(0.0, abs=1e-6)
    assert "LPIPS model vs reference" in (out / "report.md").read_text()


def test_lpips_backbone_is_really_loaded(tmp_path):
    from torchvision.models import alexnet

    from esd.evaluate.lpips_score import load_lpips, lpips_distances

    torch.manual_seed(1)
    state = {k: v for k, v in alexnet(weights=None).state_dict().items() if k.startswith("features.")}
    torch.save(state, tmp_path / "alex.pth")
    model = load_lpips(tmp_path / "alex.pth")
    assert torch.equal(model.net.slice1[0].weight, state["features.0.weight"])
    a = Image.fromarray(np.full((32, 32, 3), 40, np.uint8))
    b = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    assert lpips_distances(model, [a, a], [a, b])[1] > lpips_distances(model, [a], [a])[0]


# -------------------------------------------------------------------------------------------- coco


class _SmallFeatures(torch.nn.Module):
    """Stand-in for FID's InceptionV3: uint8 (N, 3, H, W) -> (N, 8) pooled features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)

    def forward(self, x):
        return self.conv(x.float() / 255).relu().mean((2, 3))


def _reference_folder(path: Path, n: int) -> Path:
    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path / f"real_{i}.jpg")
    return path


def test_coco_suite_fid_and_clip_score(tiny_pipe_dir, tiny_clip_dir, tmp_path, monkeypatch):
    from esd.evaluate import fid

    monkeypatch.setattr(fid, "inception_extractor", lambda path=None: _SmallFeatures())
    prompts = _csv(tmp_path / "c.csv", [[101, "a cat on a sofa", 0], [102, "two dogs in a park", 1], [103, "a red bus", 2]])
    out = tmp_path / "eval"
    assert main(["evaluate", "--suite", "coco", "--model", str(tiny_pipe_dir), "--prompts", str(prompts),
                 "--reference-images", str(_reference_folder(tmp_path / "real", 4)), "--clip-model", str(tiny_clip_dir),
                 "--output", str(out), *STEPS]) == 0
    res = json.loads((out / "metrics.json").read_text())["results"]["model"]
    assert res["fid"] > 0 and 0 <= res["clip_score"] <= 100 and len(res["per_image_clip_score"]) == 3
    assert f"{res['fid']:.4g}" in (out / "report.md").read_text()


def test_fid_is_zero_for_the_same_images_and_grows_with_a_shift():
    from esd.evaluate.fid import frechet_distance

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 200, (40, 40, 3), dtype=np.uint8)) for _ in range(6)]
    brighter = [Image.fromarray(np.asarray(im) + 55) for im in images]
    same = frechet_distance(images, images, _SmallFeatures())
    assert same == pytest.approx(0.0, abs=1e-4) and frechet_distance(brighter, images, _SmallFeatures()) > same + 1e-3


def test_clip_score_and_identification_plumbing(tiny_clip_dir):
    from esd.evaluate.clip_score import clip_scores, identify, load_clip

    clip = load_clip(str(tiny_clip_dir))
    images = [Image.new("RGB", (64, 48), c) for c in ("red", "blue")]
    scores = clip_scores(clip, images, ["a red square", "a blue square"])
    assert len(scores) == 2 and all(0 <= s <= 100 for s in scores)
    assert set(identify(clip, images, ["Van Gogh", "Rembrandt"])) <= {"Van Gogh", "Rembrandt"}


# ----------------------------------------------------------------------------------------- testbed


def test_testbed_suite_reuses_the_testbed_measurement(tiny_pipe_dir, tmp_path):
    from esd.testbed.classifier import train_classifier

    classifier = train_classifier(tmp_path / "classifier", steps=1, pool_size=16, batch_size=8, width=4)
    out = tmp_path / "eval"
    assert main(["evaluate", "--suite", "testbed", "--model", str(tiny_pipe_dir), "--reference-model", str(tiny_pipe_dir),
                 "--erased", "circle", "--num-images", "1", "--classifier", str(classifier), "--output", str(out),
                 *STEPS]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["results"]["model"]["erased_rate"] == metrics["results"]["reference"]["erased_rate"]
    assert (out / "testbed" / "model" / "grid.png").is_file() and (out / "side_by_side.png").is_file()
    assert "others_mean_accuracy" in (out / "report.md").read_text()


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("content, message", [
    ("case_number,text\n0,a cat\n", "missing column(s) prompt, evaluation_seed"),
    ("", "missing column(s) case_number, prompt, evaluation_seed"),
    ("case_number,prompt,evaluation_seed\n", "no prompts in the file"),
])
def test_bad_prompt_csv_exits_2_and_writes_nothing(tmp_path, capsys, content, message):
    (tmp_path / "p.csv").write_text(content)
    out = tmp_path / "eval"
    assert main(["evaluate", "--suite", "nudity", "--prompts", str(tmp_path / "p.csv"), "--output", str(out),
                 "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_label_column_and_erased_name_are_checked(tmp_path, capsys):
    prompts = _csv(tmp_path / "p.csv", [[0, "image of a tench", 0]])
    assert main(["evaluate", "--suite", "imagenette", "--prompts", str(prompts), "--output", str(tmp_path / "o"),
                 "--device", "cpu"]) == 2
    assert "missing column(s) class" in capsys.readouterr().err
    assert main(["evaluate", "--suite", "imagenette", "--erased", "zebra crossing", "--output", str(tmp_path / "o"),
                 "--device", "cpu"]) == 2
    assert "--erased 'zebra crossing' is not a class" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_testbed_suite_refuses_prompts(tmp_path, capsys):
    assert main(["evaluate", "--suite", "testbed", "--limit", "3", "--output", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "fixed prompts" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_fid_reference_folder_too_small_exits_2(tmp_path, capsys):
    prompts = _csv(tmp_path / "p.csv", [[0, "a cat", 0], [1, "a dog", 1]])
    out = tmp_path / "eval"
    assert main(["evaluate", "--suite", "coco", "--prompts", str(prompts), "--output", str(out), "--device", "cpu",
                 "--reference-images", str(_reference_folder(tmp_path / "real", 1))]) == 2
    assert "FID needs at least 2" in capsys.readouterr().err and not out.exists()
    assert main(["evaluate", "--suite", "coco", "--prompts", str(prompts), "--output", str(out), "--device", "cpu"]) == 2
    assert "--reference-images" in capsys.readouterr().err


def test_offline_clip_model_error_names_the_flag(tiny_pipe_dir, tmp_path, capsys):
    prompts = _csv(tmp_path / "a.csv", [[0, "a lake by Van Gogh", 1, "Van Gogh"]],
                   header=("case_number", "prompt", "evaluation_seed", "artist"))
    out = tmp_path / "eval"
    assert main(["evaluate", "--suite", "artists", "--model", str(tiny_pipe_dir), "--prompts", str(prompts),
                 "--clip-model", "nobody/no-such-clip", "--output", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--clip-model nobody/no-such-clip" in err and "--clip-model PATH" in err and not out.exists()


def test_shipped_prompt_files_match_the_generator(tmp_path):
    from esd.evaluate.prompts import DATA_DIR, write_data_files

    for written in write_data_files(tmp_path):
        assert written.read_text() == (DATA_DIR / written.name).read_text(), written.name
