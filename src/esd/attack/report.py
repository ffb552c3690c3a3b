"""What `esd attack` leaves in its folder: the image layout, metrics.json, the grids, report.md / report.html."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from esd.attack.judges import Judge
from esd.evaluate.provenance import package_versions
from esd.evaluate.report import Report, Table, image_grid, save_image, side_by_side, write_report
from esd.weights import atomic_path

GRID_ROWS, GRID_COLS = 16, 4
EMBEDS_FILE = "learned_embeds.safetensors"  # diffusers' textual-inversion file: {token: (1, D)}


def image_paths(out: Path, kind: str, index: int, n: int) -> list[Path]:
    """Where image k of prompt `index` goes: images/{target,before,after,without}/NNN_k.png."""
    return [out / "images" / kind / f"{index:03d}_{k}.png" for k in range(n)]


def rate(hits: list[bool] | None) -> float | None:
    """Share of True verdicts; None when nothing was judged."""
    return sum(hits) / len(hits) if hits else None



def summarise(records: list[dict], judge: Judge, args: argparse.Namespace, own: dict, extra: dict,
              wall_seconds: float) -> dict:
    """metrics.json: the ASR before and after (share of images showing the concept), per prompt and overall."""
    before = [h for r in records for h in r["before"]]
    after = [h for r in records for h in r["after"]]
    targets = [h for r in records for h in (r["target"] or [])]
    without = [h for r in records for h in (r.get("without") or [])]
    attack_seconds = sum(r.get("attack_seconds", 0.0) for r in records) + extra.get("inversion", {}).get("seconds", 0.0)
    budget = {"steps": args.steps, "lr": args.lr, "timesteps": list(args.timestep_range),
              "tokens": args.tokens if args.attack == "unlearndiff" else 1,
              "steps_total": args.steps * (len(records) if args.attack == "unlearndiff" else 1),
              "seconds": attack_seconds, "seconds_per_prompt": [r["seconds"] for r in records],
              "wall_seconds_this_run": wall_seconds}
    if args.attack == "unlearndiff":
        budget |= {"projection": args.projection, "exclude_concept": args.exclude_concept}
    else:
        budget |= {"batch_size": args.batch_size, "init_word": args.init_word}
    return {
        "attack": args.attack, "suite": args.suite, "concept": judge.concept,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "asr_before": rate(before), "asr_after": rate(after),
        "prompt_asr_before": rate([any(r["before"]) for r in records]),
        "prompt_asr_after": rate([any(r["after"]) for r in records]),
        "asr_without_concept": rate(without), "target_rate": rate(targets), "n_prompts": len(records),
        "num_images": args.num_images,
        "n_images": len(before), "found_prompts": [r["found_prompt"] for r in records],
        "budget": budget,
        "seeds": {"attack_seed": args.seed, "images": "image k of a prompt uses seed evaluation_seed + k "
                  "(testbed: 0..num_images-1), for the targets, the before and the after images alike",
                  "per_prompt_attack_seed": "unlearndiff: seed + prompt index" if args.attack == "unlearndiff"
                  else "textual-inversion: seed"},
        "protocol": {"judge": judge.success, **judge.protocol, "sample_steps": args.sample_steps,
                     "guidance": args.guidance, "sampler": "DDIM",
                     "asr": "share of images in which the judge finds the concept; prompt_asr: share of prompts "
                            "with at least one such image",
                     "asr_without_concept": "the erased model on the prompts with the concept's word taken out "
                                            "(prompts naming it only): what drowning the word out alone gives",
                     "targets": "the original model's images of the plain prompt; the attack learns from those "
                                "the judge finds the concept in (all of them when it finds none)"},
        "models": {"model": args.model or "testbed", "model_sha256": own["model_sha256"], "weights": args.weights,
                   "weights_sha256": own["weights_sha256"]},
        "versions": package_versions(),
        **extra,
        "per_prompt": records,
    }


def write_outputs(out: Path, metrics: dict, records: list[dict], judge: Judge, args: argparse.Namespace) -> None:
    """metrics.json, the grids and report.md / report.html."""
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2, default=str))
    shown = write_grids(out, records, args.num_images)
    summary = Table("Attack success rate (share of images showing the concept)", ["measure", "value"], [
        ["ASR before (plain prompts, erased model)", metrics["asr_before"]],
        ["ASR after (found prompts, erased model)", metrics["asr_after"]],
        ["baseline: prompts without the concept's word, erased model", metrics["asr_without_concept"]],
        ["prompts with the concept in any image, before", metrics["prompt_asr_before"]],
        ["prompts with the concept in any image, after", metrics["prompt_asr_after"]],
        ["targets showing the concept (original model)", metrics["target_rate"]],
        ["images judged per side", metrics["n_images"]],
        ["attack seconds (optimisation)", metrics["budget"]["seconds"]]])
    per = Table("Per prompt (grid rows in this order)",
                ["row", "prompt", "found prompt", "before", "after", "without the word", "targets", "seconds"],
                [[r["index"], r["prompt"], r["found_prompt"], r["asr_before"], r["asr_after"], r.get("asr_without"),
                  r["target_rate"], r["seconds"]] for r in records])
    settings = {"attack": args.attack, "suite": args.suite, "concept": judge.concept, "judge": judge.success,
                "model": metrics["models"]["model"], "weights": args.weights,
                **{k: v for k, v in metrics["budget"].items() if not isinstance(v, list) or k == "timesteps"},
                "num_images": args.num_images, "sample_steps": args.sample_steps, "guidance": args.guidance,
                "seed": args.seed,
                "versions": ", ".join(f"{k} {v}" for k, v in metrics["versions"].items() if v)}
    notes = [f"the learned token {metrics['token']} is in {EMBEDS_FILE} (diffusers: pipe.load_textual_inversion)"] \
        if "token" in metrics else []
    write_report(Report(f"esd attack: {args.attack} on {judge.concept} ({args.suite})", settings, [summary, per],
                        shown, notes), out)


def write_grids(out: Path, records: list[dict], num_images: int) -> list[tuple[str, str]]:
    """Grids of the first prompts (rows) and seeds (columns): erased model before | after, the targets."""
    shown = records[:GRID_ROWS]
    cols = min(num_images, GRID_COLS)

    def rows_of(kind: str, only: list[dict]) -> list[list[Path]]:
        return [image_paths(out, kind, r["index"], num_images)[:cols] for r in only]

    save_image(side_by_side(rows_of("before", shown), rows_of("after", shown)), out / "side_by_side.png")
    save_image(image_grid(rows_of("after", shown)), out / "grid_after.png")
    images = [("erased model: plain prompt (left) and found prompt (right), same seeds", "side_by_side.png"),
              ("erased model, found prompts (rows: prompts, columns: seeds)", "grid_after.png")]
    with_targets = [r for r in shown if r["target"] is not None]
    if with_targets:
        save_image(image_grid(rows_of("target", with_targets)), out / "grid_target.png")
        images.append(("original model, plain prompts: the attack's targets", "grid_target.png"))
    return images
