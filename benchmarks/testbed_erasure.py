"""Erase a concept from the shipped testbed on several erase seeds and measure each: is it gone, is the rest intact?

    python benchmarks/testbed_erasure.py --concept circle --erase-seeds 0,1,2,3,4 [EraseConfig flags ...]
                                          [--seeds 16] [--steps 50] [--prompt-set full] [--json FILE]

For each erase seed: `esd.erase.erase` with the settings resolved as `esd erase` resolves them (`esd.recipes.resolve`:
--recipe, else the testbed's recipe for the concept's kind, and the flags given over it), then the
testbed evaluation (`esd.testbed.evaluate.evaluate_testbed`) of the erased model. Prints one JSON line per
seed, then a table of every concept's accuracy per seed with min / mean / max over the seeds next to the base
model's, and whether the issue's bar holds on every seed (the erased concept's rate, every other concept
within its kind's allowance of the base). The base model's judgements are made once per protocol and cached in --base-cache.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from esd.app_runs import run_metadata
from esd.flags import add_config_arguments, given_settings
from esd.models import TESTBED, load_pipeline
from esd.recipes import resolve
from esd.testbed.evaluate import CONCEPTS, evaluate_testbed, summarise
from esd.testbed.render import SOLID, kind_of
from esd.weights import apply_esd_weights

# The bar (issue "Erasure that holds"): the erased concept's largest rate, and how far below the base each other
# kind may fall, by the kind erased.
ERASED_MAX = {"shape": 0.05, "style": 0.05, "colour": 0.10}
ALLOWANCE = {  # erased kind -> {other concept's kind: points below base allowed}
    "shape": {"shape": 0.05, "style": 0.05, "colour": 0.03},
    "style": {"shape": 0.05, "style": 0.05, "colour": 0.03},
    "colour": {"shape": 0.05, "style": 0.05, "colour": 0.10},
}


def summary(per_prompt: dict, erased: str) -> dict:
    """The evaluation's summary for `erased`, plus its rate per phrasing (over the prompts naming it)."""
    m = summarise(per_prompt, erased)
    kind, groups = kind_of(erased), {}
    for r in per_prompt.values():
        if r[kind] == erased:
            hits_n = groups.setdefault(r["phrasing"], [0, 0])
            hits_n[0] += r[f"{kind}_hits"]
            hits_n[1] += r["n"]
    keys = ("erased_rate", "others_mean_accuracy", "others_min_accuracy", "per_concept", "shape_accuracy",
            "colour_accuracy", "style_accuracy")
    return {k: m[k] for k in keys} | {"phrasings": {t: h / n for t, (h, n) in groups.items()}}


def measure(make_pipe, erased: str, args, out: Path, done: Path | None = None) -> dict:
    """Evaluate the pipeline `make_pipe()` gives (images and per-prompt judgements in `out`) and summarise it for
    `erased`. `done`: a metrics.json of this erase evaluated before; read instead of generating (and without
    loading the pipeline) when it used this protocol."""
    m = json.loads(done.read_text()) if done is not None and done.is_file() else {}
    if (m.get("seeds_per_prompt"), m.get("steps"), m.get("prompt_set")) != (args.seeds, args.steps, args.prompt_set):
        m = evaluate_testbed(make_pipe(), out, erased, seeds_per_prompt=args.seeds, steps=args.steps,
                             prompt_set=args.prompt_set)
    return summary(m["per_prompt"], erased)


def base_judgements(model: str, args, out: Path) -> dict:
    """The unerased model's per-prompt judgements under this protocol, generated once and cached in --base-cache.

    They do not depend on the word erased (only the summary does), so every concept's benchmark shares them.
    """
    cache = Path(args.base_cache)
    key = f"{Path(model).resolve()}/{args.seeds}/{args.steps}/{args.prompt_set}/per_prompt"
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    if key not in cached:
        m = evaluate_testbed(load_pipeline(model), out, None, seeds_per_prompt=args.seeds, steps=args.steps,
                             prompt_set=args.prompt_set)
        # Re-read before writing: another benchmark sharing the cache may have added its own entries meanwhile.
        cached = {**(json.loads(cache.read_text()) if cache.exists() else {}), key: m["per_prompt"]}
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached))
        tmp.replace(cache)  # atomic: a reader never sees half a file
    return cached[key]


# Every concept the bar covers: the words, and the solid fill a prompt without a style word asks for.
MEASURED = [*CONCEPTS, SOLID]


def allowance(erased: str, other: str) -> float:
    """How far below the base `other` may fall after erasing `erased` (the solid fill counts as a style)."""
    return ALLOWANCE[kind_of(erased)]["style" if other == SOLID else kind_of(other)]


def verdict(word: str, base: dict, seeds: list[dict]) -> dict[str, bool]:
    """Per concept: does the bar hold on every seed?"""
    kind = kind_of(word)
    ok = {word: all(s["per_concept"][word] <= ERASED_MAX[kind] for s in seeds)}
    for other in MEASURED:
        if other != word and base["per_concept"].get(other) is not None:  # --prompt-set base names no style
            ok[other] = all(s["per_concept"][other] >= base["per_concept"][other] - allowance(word, other)
                            for s in seeds)
    return ok


def table(word: str, base: dict, seeds: list[dict], erase_seeds: list[int]) -> str:
    ok = verdict(word, base, seeds)
    head = "| concept | base | " + " | ".join(f"seed {s}" for s in erase_seeds) + " | min | mean | max | bar |"
    lines = [head, "|" + "---|" * (len(erase_seeds) + 6)]
    for c in [word] + [c for c in MEASURED if c != word and base["per_concept"].get(c) is not None]:
        vals = [s["per_concept"][c] for s in seeds]
        cells = " | ".join(f"{v:.1%}" for v in vals)
        name = f"**{c}** (erased)" if c == word else c
        lines.append(f"| {name} | {base['per_concept'][c]:.1%} | {cells} | {min(vals):.1%} | "
                     f"{sum(vals) / len(vals):.1%} | {max(vals):.1%} | {'ok' if ok[c] else 'MISSED'} |")
    lines += ["", "| phrasing (prompts naming the erased word) | base | max over seeds |", "|---|---|---|"]
    for template, rate in base["phrasings"].items():
        lines.append(f"| `{template}` | {rate:.1%} | {max(s['phrasings'][template] for s in seeds):.1%} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(p, given_only=True)
    p.add_argument("--erase-seeds", default="0", help="comma-separated erase seeds, e.g. 0,1,2,3,4")
    p.add_argument("--seeds", type=int, default=16, help="evaluation seeds per prompt")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the evaluation images")
    p.add_argument("--prompt-set", default="full", choices=["full", "quick", "base"], help="evaluation prompts")
    p.add_argument("--base-cache", default="outputs/testbed-base-metrics.json")
    p.add_argument("--json", default=None, help="write every seed's numbers and the summary here")
    p.add_argument("--runs", default=None,
                   help="measure erases made before instead of erasing: RUNS/seed-S/erase/esd.safetensors for each "
                        "erase seed S (the layout of benchmarks/attack_robustness.py); an evaluation already in "
                        "RUNS/seed-S/eval/metrics.json with the same --seeds, --steps and --prompt-set is read, "
                        "not redone (tables over seeds that were erased and evaluated by separate runs)")
    p.add_argument("--erased", default=None,
                   help="the testbed word measured as erased (default: the concept's last word that is one)")
    args = p.parse_args()
    given = given_settings(args)
    base_cfg = resolve(given).config
    words = [w for w in base_cfg.concept.replace(",", " ").split() if w in CONCEPTS]
    word = args.erased or (words[-1] if words else base_cfg.concept.split()[-1])
    erase_seeds = [int(s) for s in args.erase_seeds.split(",")]
    out_root = Path(base_cfg.output or tempfile.mkdtemp(prefix="esd-bench-"))

    model = base_cfg.model or str(TESTBED)  # --model: another testbed-like folder (with classifier/)
    base = summary(base_judgements(model, args, out_root / "base"), word)

    from esd.erase import erase

    rows = []
    for seed in erase_seeds:
        resolution = resolve(given | {"seed": seed, "grid_steps": 0, "output": str(out_root / f"seed-{seed}")})
        cfg = resolution.config
        if args.runs:  # the erase was made before: its config is in the weights' metadata
            weights = Path(args.runs) / f"seed-{seed}" / "erase" / "esd.safetensors"
            run, seconds = run_metadata(weights.parent)[0], None  # the header only

            def make_pipe(weights=weights):
                pipe = load_pipeline(model)
                apply_esd_weights(pipe, weights)
                return pipe
        else:
            pipe, start = load_pipeline(model), time.perf_counter()
            run = erase(cfg, pipe=pipe, progress=False, resolution=resolution).config
            seconds = time.perf_counter() - start

            def make_pipe(pipe=pipe):
                return pipe
        done = Path(args.runs) / f"seed-{seed}" / "eval" / "metrics.json" if args.runs else None
        after = measure(make_pipe, word, args, out_root / f"seed-{seed}" / "eval", done)
        row = {"seed": seed, "concept": cfg.concept, "method": run.method, "lr": run.lr, "eta": run.eta,
               "iterations": run.iterations, "ddim_steps": run.ddim_steps, "batch_size": run.batch_size,
               "lr_schedule": run.lr_schedule, "trajectory_reuse": run.trajectory_reuse,
               "sample_from": run.sample_from, "robust": run.robust, "train_text_encoder": run.train_text_encoder,
               "erase_s": None if seconds is None else round(seconds, 1), "after": after}
        print(json.dumps(row), flush=True)
        rows.append(row)
    text = table(word, base, [r["after"] for r in rows], erase_seeds)
    ok = verdict(word, base, [r["after"] for r in rows])
    print(text)
    times = [r["erase_s"] for r in rows if r["erase_s"] is not None]
    print(f"bar met on every seed: {all(ok.values())}" + (f"; erase time {min(times):.0f}-{max(times):.0f} s" if times else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"word": word, "base": base, "seeds": rows, "bar": ok,
                                               "table": text}, indent=2))


if __name__ == "__main__":
    main()
