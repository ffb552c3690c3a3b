"""`esd evaluate --suite SUITE`: generate (or reuse) images, score them, write metrics and reports.

Order of work, chosen so that bad input costs nothing and a long run is never wasted:
1. read and check every input (prompts, flags, reference folder, existing images and manifests);
2. load the suite's scoring models (an offline download error comes before hours of generation);
3. generate only the missing images of each model (a re-run or resumed run reuses what is on disk);
4. score, then write `metrics.json`, grids, `report.md` and `report.html` (atomically, at the end).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from esd.errors import EsdError
from esd.evaluate import suites as S
from esd.evaluate.generate import DEFAULT_GUIDANCE, DEFAULT_STEPS, PromptRow, generate_rows
from esd.evaluate.images import check_manifest, check_readable, image_records, write_manifest
from esd.evaluate.prompts import read_labelled_prompts, write_prompt_csv
from esd.evaluate.provenance import model_hashes, package_versions, sha256_file
from esd.evaluate.report import Report, Table, image_grid, save_image, side_by_side, write_report
from esd.grids import beside
from esd.helpformat import DefaultsOnceFormatter
from esd.models import TESTBED, load_pipeline, resolve_device
from esd.weights import apply_esd_weights, atomic_path

GRID_ROWS, GRID_COLS = 8, 4  # the report shows the first prompts and seeds only


def register(subparsers) -> None:
    """Add `esd evaluate` to the `esd` command."""
    p = subparsers.add_parser("evaluate", help="measure a model with a standard protocol (nudity, imagenette, ...)",
                              description=__doc__.split("\n")[0], formatter_class=DefaultsOnceFormatter)
    p.add_argument("--suite", required=True, choices=S.SUITE_NAMES, help="which measurement")
    p.add_argument("--model", default=None, help="base model: HF id, diffusers folder or CompVis file (default: the testbed)")
    p.add_argument("--weights", default=None, help="an esd.safetensors file applied to --model's UNet")
    p.add_argument("--reference-model", default=None,
                   help="a second model (usually the original) evaluated on the same prompts and seeds, side by side")
    p.add_argument("--prompts", default=None, help="prompt CSV (case_number, prompt, evaluation_seed, and `class` for "
                                                   "imagenette, `artist` for artists); default: the suite's own")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompt rows")
    p.add_argument("--num-images", type=int, default=None,
                   help="images per prompt row, image k with seed evaluation_seed + k (default per suite: "
                        + ", ".join(f"{k} {v}" for k, v in S.DEFAULT_NUM_IMAGES.items()) + ")")
    p.add_argument("--output", default=None, help="results folder (default: outputs/eval-SUITE)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DDIM sampling steps")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="CFG scale (a CSV's evaluation_guidance wins)")
    p.add_argument("--image-size", type=int, default=None, help="image side (default: the model's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--erased", default=None, help="the erased concept: an imagenette class, an artist, a testbed word; "
                                                  "its numbers are reported apart from the others'")
    p.add_argument("--threshold", type=float, default=0.6, help="nudity: NudeNet score threshold")
    p.add_argument("--classifier", default=None, help="imagenette: a local torchvision ResNet-50 state dict; "
                                                      "testbed: the classifier folder")
    p.add_argument("--clip-model", default="openai/clip-vit-large-patch14",
                   help="artists, coco: CLIP model, a HF id or a local transformers folder")
    p.add_argument("--lpips-backbone", default=None, help="artists: a local AlexNet state dict for LPIPS")
    p.add_argument("--reference-images", default=None, help="coco: folder of real images for FID")
    p.add_argument("--inception", default=None, help="coco: a local copy of the FID InceptionV3 weights file")
    p.set_defaults(run=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    """The `esd evaluate` command."""
    _check_numbers(args)
    args.num_images = args.num_images or S.DEFAULT_NUM_IMAGES[args.suite]
    out = Path(args.output or f"outputs/eval-{args.suite}")
    if args.weights is not None and not Path(args.weights).is_file():
        raise EsdError(f"--weights {args.weights}: no such file")
    device = resolve_device(args.device)
    if args.suite == "testbed":
        return run_testbed(args, out, device)
    spec = S.SUITES[args.suite]
    rows, labels = _rows(spec, args)
    ctx = spec.check(args, labels, len(rows) * args.num_images)
    sides = _plan_sides(args, rows, labels, out)
    scorers = spec.load(args, device)
    for side in sides:
        _ensure_images(side, rows, args, device)
    scored = spec.score(scorers, sides, args, ctx)
    _write_results(out, args, sides, scored, rows, labels, spec.label_column)
    print(f"esd evaluate {args.suite}: {sum(len(s.records) for s in sides)} images scored; "
          f"wrote {out}/metrics.json, report.md, report.html")
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    for flag, value in (("--steps", args.steps), ("--num-images", args.num_images), ("--limit", args.limit),
                        ("--image-size", args.image_size)):
        if value is not None and value < 1:
            raise EsdError(f"{flag} must be >= 1, got {value}")


def _rows(spec: S.SuiteSpec, args: argparse.Namespace) -> tuple[list[PromptRow], dict[str, str]]:
    """The prompt rows (the user's CSV or the suite's own), cut to --limit."""
    if args.prompts is not None:
        rows, labels = read_labelled_prompts(args.prompts, spec.label_column)
    else:
        rows, labels = spec.default_rows()
    return rows[: args.limit] if args.limit else rows, labels


def _identity(model: str | None, weights: str | None, args: argparse.Namespace) -> dict:
    """The settings that make the images what they are; a reused folder must match them."""
    return {"model": model or "testbed", "weights": weights,
            "weights_sha256": sha256_file(weights) if weights else None,
            "steps": args.steps, "guidance": args.guidance, "image_size": args.image_size}


def _plan_sides(args: argparse.Namespace, rows: list[PromptRow], labels: dict[str, str], out: Path) -> list[S.Side]:
    """The image sets to make or reuse, each checked against its folder's manifest and files."""
    records = image_records(rows, args.num_images, labels or None)
    plans = [("model", args.model, args.weights)]
    if args.reference_model is not None:
        plans.append(("reference", args.reference_model, None))
    sides = []
    for name, model, weights in plans:
        side = S.Side(name, model, weights, out / "images" / name, records, _identity(model, weights, args))
        side.manifest = check_manifest(side.folder, side.identity, records)
        check_readable(side.paths)
        sides.append(side)
    return sides


def _ensure_images(side: S.Side, rows: list[PromptRow], args: argparse.Namespace, device: torch.device) -> None:
    """Generate the side's missing images (after writing its manifest); nothing to do on a re-run."""
    missing = {p.name for p in side.paths if not p.exists()}
    listed = {r["file"] for r in side.manifest.get("images", [])}
    if not missing and {r["file"] for r in side.records} <= listed:
        return
    merged = {r["file"]: r for r in side.manifest.get("images", [])} | {r["file"]: r for r in side.records}
    identity = dict(side.manifest.get("generation") or side.identity)
    if not missing:
        write_manifest(side.folder, identity, list(merged.values()))
        return
    print(f"generating {len(missing)} images with the {side.name} model ({side.model or 'testbed'})", file=sys.stderr)
    pipe = load_pipeline(side.model, device)
    if side.weights:
        apply_esd_weights(pipe, side.weights)
    if not identity.get("model_sha256"):
        identity["model_sha256"] = model_hashes(side.model or str(TESTBED))
    write_manifest(side.folder, identity, list(merged.values()))
    todo = [r for r in rows if any(f"{r.case_number}_{k}.png" in missing for k in range(args.num_images))]
    generate_rows(pipe, todo, side.folder, args.num_images, args.steps, args.guidance, args.image_size)
    side.manifest = {"generation": identity, "images": list(merged.values())}
    del pipe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the reference model is loaded next


def _models_info(sides: list[S.Side]) -> dict:
    return {s.name: {"model": s.identity["model"], "weights": s.weights, "weights_sha256": s.identity["weights_sha256"],
                     "model_sha256": (s.manifest.get("generation") or {}).get("model_sha256")} for s in sides}


def _grids(out: Path, sides: list[S.Side], args: argparse.Namespace) -> list[tuple[str, str]]:
    """Write grid PNGs (first prompts x first seeds) and return (caption, file) pairs for the report."""
    cases = list(dict.fromkeys(r["case_number"] for r in sides[0].records))[:GRID_ROWS]
    cols = min(args.num_images, GRID_COLS)

    def rows_of(side: S.Side) -> list[list[Path]]:
        return [[side.folder / f"{c}_{k}.png" for k in range(cols)] for c in cases]

    shown = []
    for side in sides:
        save_image(image_grid(rows_of(side)), out / f"grid_{side.name}.png")
        shown.append((f"{side.name} images (rows: prompts, columns: seeds)", f"grid_{side.name}.png"))
    if len(sides) == 2:
        save_image(side_by_side(rows_of(sides[0]), rows_of(sides[1])), out / "side_by_side.png")
        shown.insert(0, ("model (left) and reference (right): same prompts and seeds", "side_by_side.png"))
    return shown


def _write_results(out: Path, args: argparse.Namespace, sides: list[S.Side], scored: S.Scored,
                   rows: list[PromptRow], labels: dict[str, str], label_column: str | None) -> None:
    """metrics.json, the prompts used, grids and the two report files."""
    protocol = {"suite": args.suite, "prompts": args.prompts or "the suite's own", "n_prompts": len(rows),
                "num_images": args.num_images, "steps": args.steps, "guidance": args.guidance,
                "image_size": args.image_size, "seeds": "image k of a row uses seed evaluation_seed + k",
                "sampler": "DDIM", **scored.protocol}
    metrics = {"suite": args.suite, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "protocol": protocol,
               "models": _models_info(sides), "results": scored.results, "comparison": scored.comparison,
               "versions": package_versions(), "notes": scored.notes}
    write_prompt_csv(out / "prompts.csv", rows, labels, label_column)
    shown = _grids(out, sides, args)
    grid_rows = list(dict.fromkeys((r["case_number"], r["prompt"]) for r in sides[0].records))[:GRID_ROWS]
    tables = [*scored.tables, Table("Grid rows", ["row", "case_number", "prompt"],
                                    [[i, c, p] for i, (c, p) in enumerate(grid_rows)])]
    _write_metrics_and_report(out, metrics, args.suite, sides, tables, scored.notes, shown)


def _write_metrics_and_report(out: Path, metrics: dict, suite: str, sides: list[S.Side], tables: list[Table],
                              notes: list[str], shown: list[tuple[str, str]]) -> None:
    settings = {k: v for k, v in metrics["protocol"].items() if not isinstance(v, (list, dict))}
    for side in sides:
        label = "reference model" if side.name == "reference" else "evaluated model"
        settings[label] = side.identity["model"] + (f" + {side.weights}" if side.weights else "")
    versions = metrics["versions"]
    settings["versions"] = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2, default=str))
    write_report(Report(f"esd evaluate: {suite}", settings, tables, shown, notes), out)


# ----------------------------------------------------------------------------------------- testbed


def run_testbed(args: argparse.Namespace, out: Path, device: torch.device) -> int:
    """The testbed suite: `esd.testbed.evaluate.evaluate_testbed` per model, then the common report."""
    from esd.testbed.evaluate import check_concept, evaluate_testbed

    erased = check_concept(args.erased)
    if args.prompts is not None or args.limit is not None:
        raise EsdError("the testbed suite has fixed prompts (shapes, colours, styles in every phrasing); drop --prompts/--limit "
                       "and set the seeds per prompt with --num-images")
    plans = [("model", args.model, args.weights)] + ([("reference", args.reference_model, None)]
                                                     if args.reference_model else [])
    sides, results = [], {}
    for name, model, weights in plans:
        pipe = load_pipeline(model, device)
        if weights:
            apply_esd_weights(pipe, weights)
        side = S.Side(name, model, weights, out / "testbed" / name, [], _identity(model, weights, args))
        side.manifest = {"generation": {"model_sha256": model_hashes(model or str(TESTBED))}}
        results[name] = evaluate_testbed(pipe, side.folder, erased, seeds_per_prompt=args.num_images,
                                         steps=args.steps, guidance=args.guidance, classifier_path=args.classifier)
        sides.append(side)
        del pipe
    tables = _testbed_tables(results, erased)
    shown = [(f"{s.name} images (rows: prompts, columns: seeds)", f"testbed/{s.name}/grid.png") for s in sides]
    if len(sides) == 2:
        with Image.open(sides[0].folder / "grid.png") as a, Image.open(sides[1].folder / "grid.png") as b:
            save_image(beside(a.convert("RGB"), b.convert("RGB")), out / "side_by_side.png")
        shown.insert(0, ("model (left) and reference (right): same prompts and seeds", "side_by_side.png"))
    protocol = {"suite": "testbed", "erased": erased, "num_images": args.num_images, "steps": args.steps,
                "guidance": args.guidance, "seeds": "seeds 0..num_images-1 for every prompt",
                "measure": "esd.testbed.evaluate: the testbed classifier's shape, colour and style verdicts"}
    metrics = {"suite": "testbed", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "protocol": protocol,
               "models": _models_info(sides), "results": results, "comparison": {}, "versions": package_versions(),
               "notes": []}
    _write_metrics_and_report(out, metrics, "testbed", sides, tables, [], shown)
    print(f"esd evaluate testbed: wrote {out}/metrics.json, report.md, report.html")
    return 0


def _testbed_tables(results: dict[str, dict], erased: str | None) -> list[Table]:
    names = list(results)
    keys = ["shape_accuracy", "colour_accuracy", "style_accuracy"] + (
        ["erased_rate", "others_mean_accuracy", "others_min_accuracy"] if erased else [])
    summary = Table("Testbed summary", ["metric", *names], [[k, *(results[n].get(k) for n in names)] for k in keys])
    concepts = list(results[names[0]]["per_concept"])
    per = Table("Accuracy per concept", ["concept", *names],
                [[c, *(results[n]["per_concept"][c] for n in names)] for c in concepts])
    return [summary, per]
