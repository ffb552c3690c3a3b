"""The CLI contract end to end on a tiny pipeline folder, and every bad input with its exit code."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from esd.cli import main
from esd.config import EraseConfig
from esd.evaluate.generate import DEFAULT_GUIDANCE


def _run(*args: str, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "esd.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)


def test_erase_then_generate_with_weights(tiny_pipe_dir, tmp_path, monkeypatch):
    out = tmp_path / "erased"
    r = _run("erase", "--concept", "a red circle", "--model", str(tiny_pipe_dir), "--iterations", "8",
             "--lr", "5e-3", "--eta", "3", "--ddim-steps", "5", "--seed", "3", "--device", "cpu",
             "--grid-steps", "3", "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert {p.name for p in out.iterdir()} == {"esd.safetensors", "README.md", "recipe.json", "loss.png", "grid.png"}

    with safe_open(str(out / "esd.safetensors"), "pt") as f:
        meta = f.metadata()
        names = list(f.keys())
    cfg = EraseConfig.from_json(meta["esd_config"])
    assert (cfg.concept, cfg.method, cfg.iterations, cfg.lr, cfg.eta, cfg.seed) == ("a red circle", "xattn", 8, 5e-3,
                                                                                  3.0, 3)
    assert cfg.precision == "fp32"  # --precision auto on SD1.x: the paper's fp32
    assert meta["base_model"] == str(tiny_pipe_dir) and meta["step"] == "8"
    assert names and all(".attn2." in n for n in names)
    card = (out / "README.md").read_text()
    for needle in ("a red circle", "xattn", "η", "eps*(x,t,'') - eta", "| iterations | 8 of 8", "| seed | 3",
                   str(tiny_pipe_dir), "load_state_dict(weights, strict=False)"):
        assert needle in card, needle
    _check_card_snippet(card, out, tmp_path, monkeypatch)
    assert Image.open(out / "grid.png").size[0] > 300 and Image.open(out / "loss.png").size[0] > 300

    # generate: the same seed with and without the weights; the concept prompt must change
    base, erased = tmp_path / "base", tmp_path / "after"
    common = ["--model", str(tiny_pipe_dir), "--prompt", "a red circle", "--seed", "11", "--steps", "4",
              "--num-images", "2", "--device", "cpu"]
    assert main(["generate", *common, "--output", str(base)]) == 0
    assert main(["generate", *common, "--weights", str(out / "esd.safetensors"), "--output", str(erased)]) == 0
    assert sorted(p.name for p in erased.iterdir()) == ["0_0.png", "0_1.png"]
    # --weights applies exactly the file: the same images as a pipeline given the weights in Python, and not the base's
    from esd.evaluate.generate import PromptRow, generate_rows
    from esd.models import load_pipeline
    from esd.weights import apply_esd_weights

    pipe = load_pipeline(str(tiny_pipe_dir), "cpu")
    apply_esd_weights(pipe, out / "esd.safetensors")
    generate_rows(pipe, [PromptRow("0", "a red circle", 11)], tmp_path / "direct", 1, 4, DEFAULT_GUIDANCE, None)
    assert np.array_equal(_pixels(tmp_path / "direct" / "0_0.png"), _pixels(erased / "0_0.png"))
    assert not np.array_equal(_pixels(base / "0_0.png"), _pixels(erased / "0_0.png"))
    # the two images of a prompt use seeds 11 and 12: they differ from each other
    assert np.abs(_pixels(erased / "0_0.png") - _pixels(erased / "0_1.png")).mean() > 1.0


def _card_snippet(card: str) -> str:
    """The model card's Python block, without its last line (generating an image is slow and not what is checked)."""
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    return "\n".join(line for line in code.splitlines() if not line.startswith("image = "))


def _check_card_snippet(card: str, out, tmp_path, monkeypatch) -> None:
    """The card's loading code runs as printed, loads every tensor of the file, and refuses a file for another UNet."""
    code = _card_snippet(card)
    monkeypatch.chdir(out)
    scope: dict = {}
    exec(code, scope)  # the card's own snippet, on this run's files
    unet = scope["pipe"].unet
    for name, value in load_file("esd.safetensors").items():
        assert torch.equal(unet.get_parameter(name).detach(), value), name
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    save_file({**load_file("esd.safetensors"), "mid_block.not_a_layer.weight": torch.zeros(2)},
              str(foreign / "esd.safetensors"))
    monkeypatch.chdir(foreign)
    with pytest.raises(AssertionError, match="not tensors of this model"):
        exec(code, {})


def test_erase_help_states_each_default_once(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps help at the terminal width
    with pytest.raises(SystemExit) as exit_info:
        main(["erase", "--help"])
    assert exit_info.value.code == 0
    entries = _help_entries(capsys.readouterr().out)
    assert {"--" + f.name.replace("_", "-") for f in dataclasses.fields(EraseConfig)} <= set(entries)
    for flag, text in entries.items():
        assert "(default: None)" not in text and "(default: )" not in text, (flag, text)
        assert text.count("(default:") <= 1, (flag, text)
    assert entries["--iterations"].endswith("(default: 1000)")  # a real default is still shown
    assert entries["--model"].endswith("(default: the shipped testbed)")  # the help's own wording, once
    assert "(default" not in entries["--concept"] and "(default" not in entries["--separator"]
    assert entries["--guidance-batch"].endswith("(default: True)")
    # `esd app` uses the same formatter (it printed "(none: the shipped testbed) (default: None)").
    with pytest.raises(SystemExit) as exit_info:
        main(["app", "--help"])
    assert exit_info.value.code == 0
    app_entries = _help_entries(capsys.readouterr().out)
    for flag, text in app_entries.items():
        assert "(default: None)" not in text and text.count("(default:") <= 1, (flag, text)
    assert app_entries["--model"].endswith("(default: the shipped testbed)")
    assert app_entries["--host"].endswith("(default: 127.0.0.1)") and app_entries["--port"].endswith("(default: 7860)")
    assert "(default" not in app_entries["--config"]


def _help_entries(text: str) -> dict[str, str]:
    """argparse help -> {first flag: its help text on one line}; a wrapped line joins the entry it continues."""
    entries: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("  -"):  # a new option: "  --flag VALUE   help" or "  --flag, --no-flag"
            current = line.split()[0].rstrip(",")
            entries[current] = [line]
        elif current and line.startswith("   "):
            entries[current].append(line)
        else:
            current = None
    return {flag: " ".join(" ".join(lines).split()) for flag, lines in entries.items()}


def test_generate_from_prompt_csv_resumes(tiny_pipe_dir, tmp_path):
    csv = tmp_path / "prompts.csv"
    csv.write_text("case_number,prompt,evaluation_seed,evaluation_guidance\n7,a red circle,1,3.0\n9,a blue square,2,\n")
    out = tmp_path / "imgs"
    args = ["generate", "--model", str(tiny_pipe_dir), "--prompts", str(csv), "--steps", "2", "--device", "cpu",
            "--output", str(out)]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["7_0.png", "9_0.png"]
    first = (out / "7_0.png").stat().st_mtime_ns
    (out / "9_0.png").unlink()
    assert main(args) == 0
    assert (out / "7_0.png").stat().st_mtime_ns == first and (out / "9_0.png").exists()  # only the missing one redone


@pytest.mark.parametrize(("args", "message"), [
    (["--concept", ""], "--concept is empty"),
    (["--concept", "x", "--lr", "nan"], "--lr must be a finite number"),
    (["--concept", "x", "--eta", "inf"], "--eta must be a finite number"),
    (["--concept", "x", "--iterations", "0"], "--iterations must be >= 1"),
    (["--concept", "x", "--model", "/no/such/model"], "no such file or folder"),
    (["--concept", "x", "--sample-from", "esd", "--devices", "0"], "--devices takes two devices"),
])
def test_bad_erase_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["erase", *args, "--output", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one line
    assert not out.exists()


def test_unknown_method_fails_at_parse_time_listing_the_names(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["erase", "--concept", "x", "--method", "xatn"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'xatn'" in err and "noxattn" in err and "esd-u" in err


def test_folder_that_is_not_a_pipeline(tmp_path, capsys):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    assert main(["erase", "--concept", "x", "--model", str(tmp_path / "unet"), "--device", "cpu",
                 "--output", str(tmp_path / "o")]) == 2
    assert "no model_index.json (it looks like a single UNet folder)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_method_selecting_nothing_exits_2(tiny_pipe_dir, tmp_path, capsys):
    assert main(["erase", "--concept", "x", "--model", str(tiny_pipe_dir), "--method", "xlayer", "--device", "cpu",
                 "--output", str(tmp_path / "o")]) == 2
    assert "selects no parameter" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_generate_bad_inputs(tiny_pipe_dir, tmp_path, capsys):
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("case_number,text\n1,hello\n")
    empty_csv = tmp_path / "empty.csv"
    empty_csv.write_text("case_number,prompt,evaluation_seed\n")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    cases = [
        (["--prompts", str(bad_csv)], "missing column(s) prompt, evaluation_seed"),
        (["--prompts", str(empty_csv)], "no prompts in the file"),
        (["--prompt", "x", "--weights", str(junk)], "not a readable safetensors file"),
        (["--prompt", "x", "--weights", str(tmp_path / "missing.safetensors")], "no such file"),
    ]
    for args, message in cases:
        out = tmp_path / "o"
        assert main(["generate", "--model", str(tiny_pipe_dir), *args, "--device", "cpu", "--output", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_presets_and_separator():
    assert len(EraseConfig(concept="i2p").concepts) == 11
    assert EraseConfig(concept="allartist").concepts[1] == "Thomas Kinkade"
    assert EraseConfig(concept="a, b", separator=",").concepts == ["a", "b"]
    assert EraseConfig(concept="a, b").concepts == ["a, b"]  # no separator: one concept
    assert EraseConfig(concept="x", method="esd-u").method == "noxattn"
    assert (EraseConfig(concept="x").lr, EraseConfig(concept="x").iterations) == (1e-5, 1000)  # the paper's


def test_config_round_trips_through_json():
    cfg = EraseConfig(concept="Van Gogh", method="esd-x", lr=2e-5, grid_prompts=["a dog"])
    assert EraseConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["method"] == "xattn"
