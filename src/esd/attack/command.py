"""`esd attack --attack unlearndiff|textual-inversion`: attack an erased model, judged by a suite's own judge.

Order of work, chosen so that bad input costs nothing and an interrupted attack loses at most one prompt:
1. check every input (weights file, concept against the suite's judge, numbers, an existing folder's settings);
2. load the base model and the judge's scoring model;
3. make the targets, the *original* model's images of each prompt (`DIR/images/target/`, kept on disk);
4. apply the ESD weights; per prompt: the erased model's images of the plain prompt (`before`), the attack, the
   erased model's images of the found prompt (`after`), the judge's verdicts, written to `DIR/prompts/NNN.json`
   as soon as the prompt is done. A re-run skips the prompts already there;
5. `DIR/metrics.json` (`asr_before`, `asr_after`, ...), grids, `report.md`, `report.html`.

The attack success rate (ASR) is the share of images in which the judge finds the concept: `asr_before` for the
plain prompts, `asr_after` for the prompts the attack found, both made by the erased model with the same seeds.
`asr_without_concept` is the baseline an attack has to beat: the same prompts with the concept's word taken out
("a red" for "a red circle"), where the model draws whatever it draws by default.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from esd.attack import inversion as I
from esd.attack import unlearndiff as U
from esd.attack.embeddings import Vocabulary, concept_token_ids, encode_images
from esd.attack.judges import JUDGED_SUITES, Judge, make_judge
from esd.attack.report import EMBEDS_FILE, image_paths, rate, summarise, write_outputs
from esd.config import DEFAULT_TIMESTEPS, parse_timesteps
from esd.errors import EsdError
from esd.evaluate.generate import DEFAULT_GUIDANCE, DEFAULT_STEPS, PromptRow, generate
from esd.evaluate.provenance import sha256_file, unet_sha256
from esd.evaluate.report import save_image
from esd.helpformat import DefaultsOnceFormatter
from esd.models import TESTBED, is_sdxl, load_pipeline, resolve_device
from esd.weights import apply_esd_weights, atomic_path, load_esd_weights

ATTACKS = ("unlearndiff", "textual-inversion")
DEFAULT_BUDGET = {"unlearndiff": {"steps": 40, "lr": 0.01}, "textual-inversion": {"steps": 200, "lr": 5e-3}}


def register(subparsers) -> None:
    """Add `esd attack` to the `esd` command."""
    p = subparsers.add_parser(
        "attack", help="attack an erased model: search for prompts that bring the erased concept back",
        description=__doc__.split("\n")[0], formatter_class=DefaultsOnceFormatter)
    p.add_argument("--attack", required=True, choices=ATTACKS,
                   help="unlearndiff: k prefix tokens per prompt (UnlearnDiffAtk, Zhang et al. 2024); "
                        "textual-inversion: one new token for the concept (Pham et al. 2024)")
    p.add_argument("--concept", required=True, help="the erased concept, as the suite's judge names it "
                                                    "(testbed: a shape, colour or style word)")
    p.add_argument("--weights", default=None, help="the erased model's ESD weights file (required)")
    p.add_argument("--model", default=None, help="base model: HF id, diffusers folder or CompVis file "
                                                 "(default: the shipped testbed)")
    p.add_argument("--suite", default="testbed", choices=JUDGED_SUITES, help="whose judge decides success")
    p.add_argument("--prompts", type=int, default=12, help="attack the first N prompts naming the concept")
    p.add_argument("--prompt-file", default=None,
                   help="prompt CSV (case_number, prompt, evaluation_seed, and `class` for imagenette, `artist` "
                        "for artists); default: the suite's own")
    p.add_argument("--num-images", type=int, default=4,
                   help="images per prompt (targets and judged images), image k with seed evaluation_seed + k")
    p.add_argument("--tokens", type=int, default=5, help="unlearndiff: prefix tokens optimised per prompt")
    p.add_argument("--steps", type=int, default=None,
                   help="optimisation steps (default: unlearndiff 40 per prompt, textual-inversion 200)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: unlearndiff 0.01, AdamW; textual-inversion 0.005, Adam)")
    p.add_argument("--timesteps", default=DEFAULT_TIMESTEPS,
                   help="LOW:HIGH, the training timesteps the attack's denoising loss is drawn from; the default "
                        "is the noisiest 30%%, where an image's layout and concept are decided (0:1000: uniform)")
    p.add_argument("--projection", default="every-step", choices=U.PROJECTIONS,
                   help="unlearndiff: forward on the nearest tokens every step (straight-through) or project once "
                        "at the end")
    p.add_argument("--exclude-concept", action="store_true",
                   help="unlearndiff: never project onto tokens that spell the concept (default: off)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also judge each prompt with the concept's word taken out, the rate an attack that only "
                        "drowns the word out would reach (default: on)")
    p.add_argument("--init-word", default="a", help="textual-inversion: the word the new embedding starts from")
    p.add_argument("--batch-size", type=int, default=4, help="textual-inversion: images per step")
    p.add_argument("--seed", type=int, default=0, help="seed of the attack's initial tokens, timesteps and noise")
    p.add_argument("--sample-steps", type=int, default=DEFAULT_STEPS, help="DDIM steps of every generated image")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help="CFG scale (a CSV's evaluation_guidance wins)")
    p.add_argument("--output", default=None, help="results folder (default: outputs/attack-ATTACK-CONCEPT)")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an earlier attack's results in --output first (default: off)")
    p.add_argument("--classifier", default=None, help="testbed: the classifier folder; imagenette: a local "
                                                      "ResNet-50 state dict")
    p.add_argument("--threshold", type=float, default=0.6, help="nudity: NudeNet score threshold")
    p.add_argument("--clip-model", default="openai/clip-vit-large-patch14",
                   help="artists: CLIP model, a HF id or a local transformers folder")
    p.set_defaults(run=run_attack)


# ------------------------------------------------------------------------------------------ checks


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before loading a model; fills in the attack's default budget."""
    if args.weights is None:
        raise EsdError("an attack needs the erased model: pass --weights esd.safetensors (the base model is --model)")
    load_esd_weights(args.weights)  # a missing or damaged file is an error before any work
    budget = DEFAULT_BUDGET[args.attack]
    args.steps = budget["steps"] if args.steps is None else args.steps
    args.lr = budget["lr"] if args.lr is None else args.lr
    for flag, value in (("--prompts", args.prompts), ("--num-images", args.num_images), ("--tokens", args.tokens),
                        ("--steps", args.steps), ("--sample-steps", args.sample_steps),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            raise EsdError(f"{flag} must be >= 1, got {value}")
    if not args.lr > 0:
        raise EsdError(f"--lr must be > 0, got {args.lr}")
    args.timestep_range = parse_timesteps(args.timesteps)


def identity(args: argparse.Namespace, judge: Judge) -> dict:
    """The settings an attack's results depend on; a folder made with other ones is not resumed."""
    own = {"attack": args.attack, "suite": args.suite, "concept": judge.concept, "model": args.model or "testbed",
           "model_sha256": unet_sha256(args.model or str(TESTBED)), "weights_sha256": sha256_file(args.weights),
           "num_images": args.num_images, "steps": args.steps, "lr": args.lr, "timesteps": list(args.timestep_range),
           "seed": args.seed, "sample_steps": args.sample_steps,
           "guidance": args.guidance, "prompt_file": args.prompt_file, "classifier": args.classifier,
           "threshold": args.threshold if args.suite == "nudity" else None,
           "clip_model": args.clip_model if args.suite == "artists" else None}
    if args.attack == "unlearndiff":
        own |= {"tokens": args.tokens, "projection": args.projection, "exclude_concept": args.exclude_concept}
    else:  # one token learned from every prompt's targets: the prompt set is part of it
        own |= {"init_word": args.init_word, "batch_size": args.batch_size, "prompts": args.prompts}
    return own | {"baseline": args.baseline}


def check_folder(out: Path, own: dict, overwrite: bool) -> None:
    """Refuse an `out` that holds an attack with other settings (unless `--overwrite`); nothing is written."""
    run_file = out / "run.json"
    if overwrite:
        return
    if run_file.is_file():
        before = json.loads(run_file.read_text())
        changed = sorted(k for k in set(before) | set(own) if before.get(k) != own.get(k))
        if changed:
            raise EsdError(f"--output {out} holds an attack with other settings ({', '.join(changed)}); "
                           "use another --output, or --overwrite to start again")
    elif (out / "prompts").is_dir() and any((out / "prompts").iterdir()):
        raise EsdError(f"--output {out} holds per-prompt results without run.json; use --overwrite or another --output")


def start_folder(out: Path, own: dict, overwrite: bool) -> None:
    """Empty `out` of an earlier attack's results (`--overwrite`), then record this attack's settings."""
    if overwrite:
        for name in ("prompts", "images"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("run.json", "metrics.json", EMBEDS_FILE, "inversion.json"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "run.json") as tmp:
        tmp.write_text(json.dumps(own, indent=2))


# ------------------------------------------------------------------------------------------- images


def seeds_of(row: PromptRow, n: int) -> list[int]:
    return [row.seed + k for k in range(n)]


def make_images(pipe, prompt: str, seeds: list[int], paths: list[Path], args: argparse.Namespace,
                guidance: float | None = None) -> list[Image.Image]:
    """The images of `prompt` with `seeds` (through `esd.evaluate.generate`), saved to `paths`; files already
    there are read back instead (an interrupted run made them)."""
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    if todo:
        made = generate(pipe, [prompt] * len(todo), [seeds[i] for i in todo], args.sample_steps,
                        args.guidance if guidance is None else guidance)
        for i, image in zip(todo, made, strict=True):
            save_image(image, paths[i])
    return [_read(p) for p in paths]


def _read(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


# ------------------------------------------------------------------------------------------ the run


def run_attack(args: argparse.Namespace) -> int:
    """The `esd attack` command."""
    wall = time.perf_counter()
    check_args(args)
    judge = make_judge(args)
    rows = judge.rows[: args.prompts]
    if not rows:
        raise EsdError(f"no prompt of the {args.suite} prompt set names {judge.concept!r}")
    out = Path(args.output or f"outputs/attack-{args.attack}-{I.slug(judge.concept)}")
    own = identity(args, judge)
    check_folder(out, own, args.overwrite)
    device = resolve_device(args.device)
    pipe = load_pipeline(args.model, device)
    if is_sdxl(pipe):
        raise EsdError("esd attack supports SD1.x/SD2.x pipelines (one text encoder); SDXL is not supported yet")
    judge.load(pipe, device)
    start_folder(out, own, args.overwrite)
    print(f"esd attack {args.attack}: {len(rows)} prompts naming {judge.concept!r}, {args.num_images} seeds each; "
          f"judge: {judge.success}", file=sys.stderr)

    for i, row in enumerate(tqdm(rows, desc="targets (original model)")):
        make_images(pipe, row.prompt, seeds_of(row, args.num_images), image_paths(out, "target", i, args.num_images),
                    args, row.guidance)
    apply_esd_weights(pipe, args.weights)
    if args.attack == "unlearndiff":
        records = attack_unlearndiff(pipe, judge, rows, out, args)
        extra = {}
    else:
        records, extra = attack_inversion(pipe, judge, rows, out, args)
    metrics = summarise(records, judge, args, own, extra, time.perf_counter() - wall)
    write_outputs(out, metrics, records, judge, args)
    print(f"esd attack {args.attack}: asr_before {metrics['asr_before']:.3f}, asr_after {metrics['asr_after']:.3f} "
          f"over {metrics['n_images']} images; wrote {out}/metrics.json, report.md, report.html")
    return 0


def _done(out: Path, index: int, prompt: str) -> dict | None:
    """The record of a prompt finished by an earlier run, or None."""
    path = out / "prompts" / f"{index:03d}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("prompt") != prompt:
        raise EsdError(f"{path} is the result of prompt {record.get('prompt')!r}, not {prompt!r}; use --overwrite")
    return record


def _write_record(out: Path, record: dict) -> None:
    with atomic_path(out / "prompts" / f"{record['index']:03d}.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2))


def _targets(pipe, judge: Judge, out: Path, index: int, args: argparse.Namespace) -> tuple[list[bool], torch.Tensor]:
    """The judge's verdicts on a prompt's target images, and the latents the attack learns from: the targets
    that show the concept (all of them when none does)."""
    paths = image_paths(out, "target", index, args.num_images)
    images = [_read(p) for p in paths]
    hits = judge.seen(images, paths)
    used = [im for im, hit in zip(images, hits, strict=True) if hit] or images
    return hits, encode_images(pipe.vae, used)


def _judged(pipe, judge: Judge, prompt: str, row: PromptRow, out: Path, kind: str, index: int,
            args: argparse.Namespace) -> list[bool]:
    paths = image_paths(out, kind, index, args.num_images)
    images = make_images(pipe, prompt, seeds_of(row, args.num_images), paths, args, row.guidance)
    return judge.seen(images, paths)


def _judge_row(pipe, judge: Judge, index: int, row: PromptRow, attacked: str, kind: str,
               target_hits: list[bool] | None, out: Path, args: argparse.Namespace) -> dict:
    """The erased model's images of the plain prompt (`before`), of the attacked one (`after`) and, as the
    baseline, of the prompt without the concept's word (`without`), judged; one record of `DIR/prompts/`."""
    without = I.without_concept(row.prompt, judge.concept) if args.baseline else None
    before = _judged(pipe, judge, row.prompt, row, out, "before", index, args)
    after = _judged(pipe, judge, attacked, row, out, "after", index, args)
    without_hits = None if without is None else _judged(pipe, judge, without, row, out, "without", index, args)
    return {"index": index, "case_number": row.case_number, "prompt": row.prompt, "found_prompt": attacked,
            "kind": kind, "seeds": seeds_of(row, args.num_images), "without_prompt": without,
            "target": target_hits, "before": before, "after": after, "without": without_hits,
            "target_rate": rate(target_hits), "asr_before": rate(before), "asr_after": rate(after),
            "asr_without": rate(without_hits)}


def _pending(records: list[dict | None], what: str) -> None:
    done = sum(r is not None for r in records)
    if done:
        print(f"resuming: {done} of {len(records)} {what} already done", file=sys.stderr)


def attack_unlearndiff(pipe, judge: Judge, rows: list[PromptRow], out: Path, args: argparse.Namespace) -> list[dict]:
    """UnlearnDiffAtk on every prompt (`esd.attack.unlearndiff`), one record per prompt, written as it finishes."""
    exclude = concept_token_ids(pipe.tokenizer, judge.concept.split()) if args.exclude_concept else set()
    vocabulary = Vocabulary.of(pipe.tokenizer, pipe.text_encoder, exclude)
    records = [_done(out, i, row.prompt) for i, row in enumerate(rows)]
    _pending(records, "prompts")
    for i, row in enumerate(tqdm(rows, desc="attack prompts")):
        if records[i] is not None:
            continue
        start = time.perf_counter()
        target_hits, latents = _targets(pipe, judge, out, i, args)
        found = U.optimise_prefix(pipe, row.prompt, latents, args.tokens, args.steps, args.lr, args.seed + i,
                                  vocabulary, args.projection, timesteps=args.timestep_range, progress=True)
        attacked = U.attacked_prompt(found.prefix, row.prompt)
        records[i] = {**_judge_row(pipe, judge, i, row, attacked, "prompt", target_hits, out, args),
                      **_prefix_fields(found, pipe, attacked, row.prompt), "seconds": time.perf_counter() - start}
        _write_record(out, records[i])
    return records


def _prefix_fields(found: U.PrefixResult, pipe, attacked: str, prompt: str) -> dict:
    """What one prefix attack found and cost, and whether its text gives back its tokens."""
    fields = asdict(found)
    retok = pipe.tokenizer(attacked, add_special_tokens=False).input_ids
    fields["retokenizes_exactly"] = list(retok) == found.token_ids + list(
        pipe.tokenizer(prompt, add_special_tokens=False).input_ids)
    fields["attack_seconds"] = fields.pop("seconds")
    return fields


def attack_inversion(pipe, judge: Judge, rows: list[PromptRow], out: Path,
                     args: argparse.Namespace) -> tuple[list[dict], dict]:
    """The textual-inversion attack: learn the token once (kept in DIR/learned_embeds.safetensors), then judge
    every prompt with the token in the concept's place, and "<token>", "a <token>"."""
    token = I.placeholder_token(judge.concept)
    info_file, embeds_file = out / "inversion.json", out / EMBEDS_FILE
    templates = [I.template_of(row.prompt, judge.concept) for row in rows]
    if info_file.is_file() and embeds_file.is_file():
        info = json.loads(info_file.read_text())
        vector = load_file(str(embeds_file))[token][0]
        print(f"resuming: the token {token} learned by an earlier run ({embeds_file})", file=sys.stderr)
    else:
        examples, target_hits = [], {}
        for i, tpl in enumerate(templates):
            target_hits[i], latents = _targets(pipe, judge, out, i, args)
            examples.append((tpl, latents))
        learned = I.learn_token(pipe, examples, judge.concept, args.steps, args.lr, args.seed, args.init_word,
                                args.batch_size, args.timestep_range, progress=True)
        vector = learned.vector
        info = {"token": token, **{k: v for k, v in asdict(learned).items() if k != "vector"},
                "target_hits": {str(k): v for k, v in target_hits.items()}}
        with atomic_path(embeds_file) as tmp:
            save_file({token: vector[None].contiguous()}, str(tmp))
        with atomic_path(info_file) as tmp:
            tmp.write_text(json.dumps(info, indent=2))
    I.add_token(pipe, token, vector)
    plain = {row.prompt for row in rows}
    extra_rows = [(PromptRow(f"generic-{k}", tpl.render(judge.concept), 0), tpl)
                  for k, tpl in enumerate(I.GENERIC) if tpl.render(judge.concept) not in plain]
    jobs = list(zip(rows, templates, strict=True)) + extra_rows
    records = [_done(out, i, row.prompt) for i, (row, _) in enumerate(jobs)]
    _pending(records, "prompts")
    for i, (row, tpl) in enumerate(tqdm(jobs, desc="judge prompts")):
        if records[i] is not None:
            continue
        start = time.perf_counter()
        is_prompt = i < len(rows)
        target_hits = info["target_hits"].get(str(i)) if is_prompt else None
        if is_prompt and target_hits is None:
            target_hits, _ = _targets(pipe, judge, out, i, args)
        records[i] = {**_judge_row(pipe, judge, i, row, tpl.render(token), "prompt" if is_prompt else "generic",
                                   target_hits, out, args), "seconds": time.perf_counter() - start}
        _write_record(out, records[i])
    extra = {"token": token, "token_file": EMBEDS_FILE, "init_word": info["init_word"],
             "inversion": {k: info[k] for k in ("loss_start", "loss_end", "loss_concept", "seconds", "losses")}}
    return records, extra
