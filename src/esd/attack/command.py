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
from esd.attack.config import AttackConfig
from esd.attack.judges import Judge, make_judge
from esd.attack.report import EMBEDS_FILE, image_paths, rate, summarise, write_outputs
from esd.embeddings import Vocabulary, concept_token_ids, encode_images
from esd.errors import EsdError
from esd.evaluate.generate import PromptRow, generate
from esd.evaluate.provenance import sha256_file, unet_sha256
from esd.evaluate.report import save_image
from esd.flags import add_config_arguments, config_from_args
from esd.helpformat import DefaultsOnceFormatter
from esd.models import TESTBED, is_sdxl, load_pipeline, resolve_device
from esd.weights import apply_esd_weights, atomic_path, load_esd_weights


def register(subparsers) -> None:
    """Add `esd attack` to the `esd` command: its flags are AttackConfig's fields."""
    p = subparsers.add_parser(
        "attack", help="attack an erased model: search for prompts that bring the erased concept back",
        description=__doc__.split("\n")[0], formatter_class=DefaultsOnceFormatter)
    add_config_arguments(p, AttackConfig)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """`esd attack`: the flags as an AttackConfig, then `attack`."""
    attack(config_from_args(args, AttackConfig))
    return 0


# ------------------------------------------------------------------------------------------ checks


def identity(cfg: AttackConfig, judge: Judge) -> dict:
    """The settings an attack's results depend on; a folder made with other ones is not resumed."""
    own = {"attack": cfg.attack, "suite": cfg.suite, "concept": judge.concept, "model": cfg.model or "testbed",
           "model_sha256": unet_sha256(cfg.model or str(TESTBED)), "weights_sha256": sha256_file(cfg.weights),
           "num_images": cfg.num_images, "steps": cfg.steps, "lr": cfg.lr, "timesteps": list(cfg.timestep_range),
           "seed": cfg.seed, "sample_steps": cfg.sample_steps,
           "guidance": cfg.guidance, "prompt_file": cfg.prompt_file, "classifier": cfg.classifier,
           "threshold": cfg.threshold if cfg.suite == "nudity" else None,
           "clip_model": cfg.clip_model if cfg.suite == "artists" else None}
    if cfg.attack == "unlearndiff":
        own |= {"tokens": cfg.tokens, "projection": cfg.projection, "exclude_concept": cfg.exclude_concept}
    else:  # one token learned from every prompt's targets: the prompt set is part of it
        own |= {"init_word": cfg.init_word, "batch_size": cfg.batch_size, "prompts": cfg.prompts}
    return own | {"baseline": cfg.baseline}


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


def make_images(pipe, prompt: str, seeds: list[int], paths: list[Path], cfg: AttackConfig,
                guidance: float | None = None) -> list[Image.Image]:
    """The images of `prompt` with `seeds` (through `esd.evaluate.generate`), saved to `paths`; files already
    there are read back instead (an interrupted run made them)."""
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    if todo:
        made = generate(pipe, [prompt] * len(todo), [seeds[i] for i in todo], cfg.sample_steps,
                        cfg.guidance if guidance is None else guidance)
        for i, image in zip(todo, made, strict=True):
            save_image(image, paths[i])
    return [_read(p) for p in paths]


def _read(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


# ------------------------------------------------------------------------------------------ the run


def attack(cfg: AttackConfig) -> dict:
    """Run the attack `cfg` describes on its erased model; write DIR/metrics.json, grids and reports and return the
    metrics (`asr_before`, `asr_after`, ...). Bad input raises `EsdError` before any model is loaded."""
    wall = time.perf_counter()
    cfg = cfg.with_budget()
    load_esd_weights(cfg.weights)  # a missing or damaged file is an error before any work
    judge = make_judge(cfg)
    rows = judge.rows[: cfg.prompts]
    if not rows:
        raise EsdError(f"no prompt of the {cfg.suite} prompt set names {judge.concept!r}")
    out = Path(cfg.output or f"outputs/attack-{cfg.attack}-{I.slug(judge.concept)}")
    own = identity(cfg, judge)
    check_folder(out, own, cfg.overwrite)
    device = resolve_device(cfg.device)
    pipe = load_pipeline(cfg.model, device)
    if is_sdxl(pipe):
        raise EsdError("esd attack supports SD1.x/SD2.x pipelines (one text encoder); SDXL is not supported yet")
    judge.load(pipe, device)
    start_folder(out, own, cfg.overwrite)
    print(f"esd attack {cfg.attack}: {len(rows)} prompts naming {judge.concept!r}, {cfg.num_images} seeds each; "
          f"judge: {judge.success}", file=sys.stderr)

    for i, row in enumerate(tqdm(rows, desc="targets (original model)")):
        make_images(pipe, row.prompt, seeds_of(row, cfg.num_images), image_paths(out, "target", i, cfg.num_images),
                    cfg, row.guidance)
    apply_esd_weights(pipe, cfg.weights)
    if cfg.attack == "unlearndiff":
        records = attack_unlearndiff(pipe, judge, rows, out, cfg)
        extra = {}
    else:
        records, extra = attack_inversion(pipe, judge, rows, out, cfg)
    metrics = summarise(records, judge, cfg, own, extra, time.perf_counter() - wall)
    write_outputs(out, metrics, records, judge, cfg)
    print(f"esd attack {cfg.attack}: asr_before {metrics['asr_before']:.3f}, asr_after {metrics['asr_after']:.3f} "
          f"over {metrics['n_images']} images; wrote {out}/metrics.json, report.md, report.html")
    return metrics


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


def _targets(pipe, judge: Judge, out: Path, index: int, cfg: AttackConfig) -> tuple[list[bool], torch.Tensor]:
    """The judge's verdicts on a prompt's target images, and the latents the attack learns from: the targets
    that show the concept (all of them when none does)."""
    paths = image_paths(out, "target", index, cfg.num_images)
    images = [_read(p) for p in paths]
    hits = judge.seen(images, paths)
    used = [im for im, hit in zip(images, hits, strict=True) if hit] or images
    return hits, encode_images(pipe.vae, used)


def _judged(pipe, judge: Judge, prompt: str, row: PromptRow, out: Path, kind: str, index: int,
            cfg: AttackConfig) -> list[bool]:
    paths = image_paths(out, kind, index, cfg.num_images)
    images = make_images(pipe, prompt, seeds_of(row, cfg.num_images), paths, cfg, row.guidance)
    return judge.seen(images, paths)


def _judge_row(pipe, judge: Judge, index: int, row: PromptRow, attacked: str, kind: str,
               target_hits: list[bool] | None, out: Path, cfg: AttackConfig) -> dict:
    """The erased model's images of the plain prompt (`before`), of the attacked one (`after`) and, as the
    baseline, of the prompt without the concept's word (`without`), judged; one record of `DIR/prompts/`."""
    without = I.without_concept(row.prompt, judge.concept) if cfg.baseline else None
    before = _judged(pipe, judge, row.prompt, row, out, "before", index, cfg)
    after = _judged(pipe, judge, attacked, row, out, "after", index, cfg)
    without_hits = None if without is None else _judged(pipe, judge, without, row, out, "without", index, cfg)
    return {"index": index, "case_number": row.case_number, "prompt": row.prompt, "found_prompt": attacked,
            "kind": kind, "seeds": seeds_of(row, cfg.num_images), "without_prompt": without,
            "target": target_hits, "before": before, "after": after, "without": without_hits,
            "target_rate": rate(target_hits), "asr_before": rate(before), "asr_after": rate(after),
            "asr_without": rate(without_hits)}


def _pending(records: list[dict | None], what: str) -> None:
    done = sum(r is not None for r in records)
    if done:
        print(f"resuming: {done} of {len(records)} {what} already done", file=sys.stderr)


def attack_unlearndiff(pipe, judge: Judge, rows: list[PromptRow], out: Path, cfg: AttackConfig) -> list[dict]:
    """UnlearnDiffAtk on every prompt (`esd.attack.unlearndiff`), one record per prompt, written as it finishes."""
    exclude = concept_token_ids(pipe.tokenizer, judge.concept.split()) if cfg.exclude_concept else set()
    vocabulary = Vocabulary.of(pipe.tokenizer, pipe.text_encoder, exclude)
    records = [_done(out, i, row.prompt) for i, row in enumerate(rows)]
    _pending(records, "prompts")
    for i, row in enumerate(tqdm(rows, desc="attack prompts")):
        if records[i] is not None:
            continue
        start = time.perf_counter()
        target_hits, latents = _targets(pipe, judge, out, i, cfg)
        found = U.optimise_prefix(pipe, row.prompt, latents, cfg.tokens, cfg.steps, cfg.lr, cfg.seed + i,
                                  vocabulary, cfg.projection, timesteps=cfg.timestep_range, progress=True)
        attacked = U.attacked_prompt(found.prefix, row.prompt)
        records[i] = {**_judge_row(pipe, judge, i, row, attacked, "prompt", target_hits, out, cfg),
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
                     cfg: AttackConfig) -> tuple[list[dict], dict]:
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
            target_hits[i], latents = _targets(pipe, judge, out, i, cfg)
            examples.append((tpl, latents))
        learned = I.learn_token(pipe, examples, judge.concept, cfg.steps, cfg.lr, cfg.seed, cfg.init_word,
                                cfg.batch_size, cfg.timestep_range, progress=True)
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
            target_hits, _ = _targets(pipe, judge, out, i, cfg)
        records[i] = {**_judge_row(pipe, judge, i, row, tpl.render(token), "prompt" if is_prompt else "generic",
                                   target_hits, out, cfg), "seconds": time.perf_counter() - start}
        _write_record(out, records[i])
    extra = {"token": token, "token_file": EMBEDS_FILE, "init_word": info["init_word"],
             "inversion": {k: info[k] for k in ("loss_start", "loss_end", "loss_concept", "seconds", "losses")}}
    return records, extra
