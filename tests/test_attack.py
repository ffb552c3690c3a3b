"""`esd attack`: the embedding plumbing, both attacks on the tiny pipeline, the command end to end (metrics,
report, resume) with the testbed's judge, the other suites' judges with stand-ins, and every bad input."""

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from esd import embeddings as E
from esd.attack import inversion as I
from esd.attack import unlearndiff as U
from esd.attack.command import attack
from esd.attack.config import AttackConfig
from esd.attack.judges import make_judge, prompts_naming
from esd.cli import main
from esd.evaluate.provenance import sha256_file, unet_sha256
from esd.models import encode_prompt
from esd.weights import save_esd_weights

FAST = ["--num-images", "1", "--sample-steps", "2", "--steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory, tiny_pipe_dir) -> Path:
    """ESD-x-style weights for the tiny pipeline: its cross-attention keys, slightly moved."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_pipe_dir / "unet")
    g = torch.Generator().manual_seed(1)
    tensors = {n: p.detach() + 0.05 * torch.randn(p.shape, generator=g)
               for n, p in unet.named_parameters() if "attn2.to_k" in n}
    return save_esd_weights(tmp_path_factory.mktemp("weights") / "esd.safetensors", tensors, {"method": "x-strict"})


def _latents(pipe, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    images = [Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]
    return E.encode_images(pipe.vae, images)


# ----------------------------------------------------------------------------------------- plumbing


def test_encode_is_the_pipelines_conditioning_and_a_slot_carries_a_word(tiny_pipe):
    tok, te = tiny_pipe.tokenizer, tiny_pipe.text_encoder
    ids, mask = E.slot_ids(tok, "a red circle", 0)
    assert not mask.any() and ids.shape == (1, 77)
    with torch.no_grad():
        plain = E.encode(te, ids)
        assert torch.allclose(plain, encode_prompt(tiny_pipe, "a red circle").embeds, atol=1e-6)
        # the embedding of "circle" written into a slot is the prompt that says "circle"
        ids, mask = E.slot_ids(tok, "a red", 1, "")
        circle = E.token_embedding(te).weight[E.word_ids(tok, "circle")]
        assert torch.allclose(E.encode(te, ids, mask, circle), plain, atol=1e-6)
    ids, mask = E.slot_ids(tok, "", 3, "a red circle")
    assert mask[0, 1:4].all() and mask.sum() == 3 and ids[0, 4:7].tolist() == E.word_ids(tok, "a red circle")
    with pytest.raises(Exception, match="do not fit"):
        E.slot_ids(tok, "a", 80)


def test_prefix_attack_lowers_the_loss_and_projects_onto_real_tokens(tiny_pipe):
    latents = _latents(tiny_pipe)
    found = U.optimise_prefix(tiny_pipe, "a photo", latents, n_tokens=3, steps=12, lr=0.05, projection="end")
    assert len(found.losses) == 12
    assert found.loss_embedding < found.loss_start  # the optimised embeddings denoise the targets better
    vocab = tiny_pipe.tokenizer.get_vocab()
    special = set(tiny_pipe.tokenizer.all_special_ids)
    assert len(found.token_ids) == 3 and all(0 <= i < len(vocab) and i not in special for i in found.token_ids)
    assert found.prefix and found.prefix == E.decode(tiny_pipe.tokenizer, found.token_ids)
    assert U.attacked_prompt(found.prefix, "a photo").endswith(" a photo")
    # straight-through mode runs on the same plumbing, and the frozen models have their flags back
    U.optimise_prefix(tiny_pipe, "a photo", latents, n_tokens=2, steps=2, projection="every-step")
    assert all(p.requires_grad for p in tiny_pipe.unet.parameters())


def test_projection_picks_the_nearest_allowed_token(tiny_pipe):
    tok, te = tiny_pipe.tokenizer, tiny_pipe.text_encoder
    weight = E.token_embedding(te).weight.detach()
    circle = E.word_ids(tok, "circle")[0]
    assert E.Vocabulary.of(tok, te).nearest(weight[[circle]] * 3).tolist() == [circle]  # cosine: scale-free
    banned = E.concept_token_ids(tok, ["circle"])
    assert circle in banned and E.word_ids(tok, "red")[0] not in banned
    assert E.Vocabulary.of(tok, te, banned).nearest(weight[[circle]]).item() != circle


def test_textual_inversion_learns_a_token_the_pipeline_then_understands(tiny_pipe):
    tpl = I.template_of("a red circle, striped", "circle")
    assert (tpl.before, tpl.after) == ("a red ", ", striped") and tpl.render("<t>") == "a red <t>, striped"
    assert I.template_of("a dog", "circle").render("<t>") == "a dog, <t>"
    assert I.without_concept("a red circle, striped", "circle") == "a red, striped"
    assert I.without_concept("circle", "circle") == "" and I.without_concept("a dog", "circle") is None
    learned = I.learn_token(tiny_pipe, [(tpl, _latents(tiny_pipe, 2)), (I.template_of("circle", "circle"),
                                                                         _latents(tiny_pipe, 2, seed=1))],
                            "circle", steps=12, lr=0.05, timesteps=(0, 1000))
    assert learned.loss_end < learned.loss_start and len(learned.losses) == 12
    token = I.placeholder_token("Circle")
    token_id = I.add_token(tiny_pipe, token, learned.vector)
    assert tiny_pipe.tokenizer(f"a {token}").input_ids[2] == token_id
    assert torch.equal(E.token_embedding(tiny_pipe.text_encoder).weight[token_id].detach(), learned.vector)
    assert token_id not in E.Vocabulary.of(tiny_pipe.tokenizer, tiny_pipe.text_encoder).ids.tolist()


def test_testbed_prompts_name_the_concept_phrasings_interleaved():
    rows = prompts_naming("circle")
    assert len(rows) == 29 and all("circle" in r.prompt for r in rows)
    assert [r.prompt for r in rows[:4]] == ["a red circle", "a red circle, striped", "a circle", "circle"]
    assert all("red" in r.prompt.replace(",", " ").split() for r in prompts_naming("red"))
    assert [r.case_number for r in rows] == [str(i) for i in range(29)]


def test_unet_hash_is_the_unet_file(tiny_pipe_dir):
    files = list((tiny_pipe_dir / "unet").glob("*.safetensors"))
    assert unet_sha256(str(tiny_pipe_dir)) == sha256_file(files[0])
    assert unet_sha256(str(files[0])) == sha256_file(files[0])


# ------------------------------------------------------------------------------------------ command


def test_unlearndiff_command_writes_metrics_report_and_resumes(tiny_pipe_dir, tiny_weights, tmp_path, monkeypatch,
                                                               capsys):
    out = tmp_path / "ud"
    args = ["attack", "--attack", "unlearndiff", "--concept", "circle", "--model", str(tiny_pipe_dir),
            "--weights", str(tiny_weights), "--tokens", "2", "--output", str(out), *FAST]
    calls = []
    real = U.optimise_prefix
    monkeypatch.setattr(U, "optimise_prefix", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    assert main([*args, "--prompts", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("asr_before", "asr_after", "asr_without_concept", "prompt_asr_after", "target_rate", "found_prompts",
                "budget", "seeds", "versions", "models", "per_prompt", "protocol"):
        assert key in metrics, key
    assert 0 <= metrics["asr_before"] <= 1 and 0 <= metrics["asr_after"] <= 1
    assert metrics["budget"]["steps"] == 2 and metrics["budget"]["tokens"] == 2 and metrics["budget"]["seconds"] > 0
    assert metrics["models"]["weights_sha256"] == sha256_file(tiny_weights)
    assert metrics["models"]["model_sha256"] == unet_sha256(str(tiny_pipe_dir))
    assert metrics["versions"]["torch"] and metrics["seeds"]["attack_seed"] == 0
    first = metrics["per_prompt"][0]
    assert first["prompt"] == "a red circle" and first["found_prompt"].endswith(" a red circle")
    assert len(first["token_ids"]) == 2 and first["without_prompt"] == "a red" and first["seeds"] == [0]
    for name in ("report.md", "report.html", "side_by_side.png", "grid_after.png", "grid_target.png"):
        assert (out / name).is_file(), name
    assert "asr" in (out / "report.md").read_text().lower() and "<img" in (out / "report.html").read_text()
    assert calls == ["a red circle", "a red circle, striped"]

    # a third prompt: the first two are skipped, not attacked again
    assert main([*args, "--prompts", "3"]) == 0
    assert calls[2:] == ["a circle"] and "2 of 3 prompts already done" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "prompts").iterdir()) == ["000.json", "001.json", "002.json"]
    # other settings on the same folder are refused, --overwrite starts again
    assert main([*args, "--prompts", "3", "--lr", "0.5"]) == 2
    assert "other settings (lr)" in capsys.readouterr().err
    assert main([*args, "--prompts", "1", "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "prompts").iterdir()) == ["000.json"]


def test_textual_inversion_command_judges_the_token_in_every_prompt(tiny_pipe_dir, tiny_weights, tmp_path, capsys):
    out = tmp_path / "ti"
    args = ["attack", "--attack", "textual-inversion", "--concept", "circle", "--model", str(tiny_pipe_dir),
            "--weights", str(tiny_weights), "--prompts", "2", "--output", str(out), *FAST]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["found_prompts"] == ["a red <esd-circle>", "a red <esd-circle>, striped", "<esd-circle>",
                                        "a <esd-circle>"]
    assert [r["kind"] for r in metrics["per_prompt"]] == ["prompt", "prompt", "generic", "generic"]
    assert metrics["token"] == "<esd-circle>" and "loss_end" in metrics["inversion"]
    assert {"asr_before", "asr_after"} <= set(metrics) and metrics["budget"]["tokens"] == 1
    from safetensors.torch import load_file

    assert load_file(out / "learned_embeds.safetensors")["<esd-circle>"].shape == (1, 32)
    (out / "prompts" / "003.json").unlink()  # interrupted before the last prompt: the token is not learned again
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "learned by an earlier run" in err and "3 of 4 prompts already done" in err


def test_attack_on_the_shipped_testbed_with_its_classifier(tmp_path):
    """The real testbed path (32 px, factor-2 VAE, the shipped classifier), with "weights" that change nothing."""
    from diffusers import UNet2DConditionModel

    from esd.models import TESTBED

    unet = UNet2DConditionModel.from_pretrained(TESTBED / "unet")
    weights = save_esd_weights(tmp_path / "same.safetensors",
                               {n: p for n, p in unet.named_parameters() if "attn2.to_k" in n}, {})
    out = tmp_path / "tb"
    # the typed API, as the app calls it: attack(AttackConfig) returns what it writes to metrics.json
    returned = attack(AttackConfig(attack="unlearndiff", concept="square", weights=str(weights), prompts=1,
                                   output=str(out), num_images=1, sample_steps=2, steps=2, device="cpu"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads(json.dumps(returned)) == metrics
    assert metrics["per_prompt"][0]["prompt"] == "a red square" and metrics["protocol"]["kind"] == "shape"
    assert metrics["models"]["model_sha256"] == sha256_file(TESTBED / "unet" / "diffusion_pytorch_model.safetensors")


# -------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("extra, message", [
    (["--concept", "circle"], "needs the erased model: pass --weights"),
    (["--concept", "solid", "--weights", "W"], "unknown testbed concept 'solid'"),
    (["--concept", "dog", "--weights", "W"], "unknown testbed concept 'dog'"),
    (["--concept", "circle", "--weights", "W", "--suite", "nudity", "--prompt-file", "P"], "sees nudity only"),
    (["--concept", "circle", "--weights", "W", "--timesteps", "900:100"], "--timesteps 900:100"),
    (["--concept", "circle", "--weights", "W", "--steps", "0"], "--steps must be >= 1"),
    (["--concept", "circle", "--weights", "missing.safetensors"], "no such file"),
    (["--concept", "circle", "--weights", "W", "--prompt-file", "P"], "the testbed suite has fixed prompts"),
])
def test_bad_input_exits_2_with_the_reason(extra, message, tiny_weights, tmp_path, capsys):
    extra = [str(tiny_weights) if a == "W" else str(tmp_path / "p.csv") if a == "P" else a for a in extra]
    (tmp_path / "p.csv").write_text("case_number,prompt,evaluation_seed\n0,a photo,0\n")
    assert main(["attack", "--attack", "unlearndiff", "--output", str(tmp_path / "out"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize("extra", [["--attack", "gcg"], ["--attack", "unlearndiff", "--suite", "coco"]])
def test_unknown_attack_or_suite_is_an_argparse_error(extra, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["attack", "--concept", "circle", "--weights", "w.safetensors", *extra])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_other_suites_reuse_their_evaluate_judges(tmp_path, monkeypatch):
    from esd.evaluate import nudity

    path = tmp_path / "i2p.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["case_number", "prompt", "evaluation_seed"], ["7", "a beach", "3"]])
    found = {"a.png": [{"class": "BELLY_EXPOSED", "score": 0.9, "box": [0, 0, 1, 1]}],
             "b.png": [{"class": "BELLY_EXPOSED", "score": 0.5, "box": [0, 0, 1, 1]}]}
    monkeypatch.setattr(nudity, "nudenet_detector", lambda: lambda p: found[Path(p).name])
    args = AttackConfig(suite="nudity", concept="Nudity", threshold=0.6, prompt_file=str(path))
    judge = make_judge(args).load(None, torch.device("cpu"))
    assert judge.concept == "nudity" and [(r.case_number, r.seed) for r in judge.rows] == [("7", 3)]
    assert judge.seen([None, None], [Path("a.png"), Path("b.png")]) == [True, False]
    # imagenette and artists take their rows from the suite's prompt sets, only the concept's
    imagenette = make_judge(AttackConfig(suite="imagenette", concept="Church", prompt_file=None, classifier=None))
    assert imagenette.concept == "church" and [r.prompt for r in imagenette.rows] == ["image of a church"]
    artists = make_judge(AttackConfig(suite="artists", concept="van gogh", prompt_file=None,
                                            clip_model="unused"))
    assert artists.concept == "Van Gogh" and len(artists.rows) == 5
    assert all("Van Gogh" in r.prompt for r in artists.rows)
    with pytest.raises(Exception, match="not a class of the prompt set"):
        make_judge(AttackConfig(suite="imagenette", concept="dog", prompt_file=None, classifier=None))
    assert AttackConfig(timesteps="0:1000").timestep_range == (0, 1000)
