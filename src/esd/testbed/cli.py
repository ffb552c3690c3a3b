"""`esd testbed train|eval`: retrain the shapes testbed from a seed, or measure a (possibly erased) model on it."""

from __future__ import annotations

import argparse
from pathlib import Path

from esd.testbed import DEFAULT_TESTBED, FULL, QUICK


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `testbed` with its sub-commands `train` and `eval` to the `esd` command."""
    parser = subparsers.add_parser(
        "testbed",
        help="train or evaluate the small shapes-and-colours testbed model",
        description="The testbed: a small Stable Diffusion pipeline drawing coloured shapes, shipped in models/testbed/.",
    )
    sub = parser.add_subparsers(dest="testbed_command", required=True, metavar="{train,eval}")

    train = sub.add_parser("train", help="train the testbed pipeline (+ classifier, metrics, model card) from a seed")
    train.add_argument("--seed", type=int, default=0, help="seed of the data, the initial weights and every batch")
    train.add_argument("--minutes", type=float, default=60.0, help="time budget, counted across resumed runs")
    train.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    train.add_argument(
        "--output", type=Path, default=Path("outputs/testbed"), help="folder for the pipeline and checkpoints"
    )
    train.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many diffusion steps (exact reproduction)"
    )
    train.add_argument(
        "--vae-steps",
        type=int,
        default=None,
        help="autoencoder steps (default 2000, or less if the time budget runs short)",
    )
    train.add_argument("--batch-size", type=int, default=None, help="diffusion batch size (default 256)")
    train.add_argument(
        "--warm-start",
        default=None,
        help="start from this trained testbed folder (same architecture) instead of random weights",
    )
    train.add_argument("--eval-seeds", type=int, default=None, help="seeds per prompt of the final quality check")
    train.add_argument("--no-resume", action="store_true", help="start afresh even if <output>/checkpoint exists")

    ev = sub.add_parser("eval", help="generate every testbed prompt (shapes, colours, styles, phrasings) and classify the images")
    ev.add_argument(
        "--model",
        default=str(DEFAULT_TESTBED),
        help="diffusers folder of the base model (default: the shipped testbed)",
    )
    ev.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="safetensors file of UNet parameters (diffusers names) to load over the model",
    )
    ev.add_argument("--erased", default=None, help="the erased concept: a shape, colour or style word, e.g. circle")
    ev.add_argument("--output", type=Path, required=True, help="folder for metrics.json and grid.png")
    ev.add_argument("--full", action="store_true",
                    help=f"the full protocol: {FULL[0]} seeds x {FULL[1]} steps per prompt "
                    f"({FULL[0] * FULL[1] / (QUICK[0] * QUICK[1]):.0f} times the work) "
                    f"instead of the quick one, {QUICK[0]} seeds x {QUICK[1]} steps (under a minute on 2 "
                    "CPU cores; erased rates within about 4 points of 16 seeds', another concept's fall "
                    "within about 14, docs/results.md)")
    ev.add_argument("--seeds", "--num-images", dest="seeds", type=int, default=None,
                    help="seeds (images) per prompt, over the protocol's; --num-images is the same setting's name "
                    "in `esd evaluate`")
    ev.add_argument("--prompt-set", default="full", choices=["full", "quick", "base"],
                    help="full: every phrasing (94 prompts); quick: 34 prompts for sweeps; base: the 12 "
                         "'a {colour} {shape}' prompts")
    ev.add_argument("--steps", type=int, default=None, help="DDIM steps, over the protocol's")
    ev.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    ev.add_argument("--device", default="auto", help="torch device, e.g. cpu or cuda")
    ev.add_argument("--classifier", type=Path, default=None, help="classifier folder (default: <model>/classifier)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run `esd testbed train` or `esd testbed eval`; returns the exit code."""
    if args.testbed_command == "train":
        from esd.testbed.train import TrainConfig, train_testbed

        cfg = TrainConfig()
        if args.batch_size is not None:
            cfg.batch_size = args.batch_size
        if args.vae_steps is not None:
            cfg.vae_steps = args.vae_steps
        if args.eval_seeds is not None:
            cfg.eval_seeds = args.eval_seeds
        cfg.warm_start = args.warm_start
        out = train_testbed(
            args.output,
            seed=args.seed,
            minutes=args.minutes,
            device=args.device,
            max_steps=args.max_steps,
            resume=not args.no_resume,
            config=cfg,
        )
        print(f"testbed written to {out}")
        return 0
    from esd.evaluate.provenance import sha256_file
    from esd.models import apply_esd_weights, load_pipeline, resolve_device
    from esd.testbed.evaluate import evaluate_testbed

    pipe = load_pipeline(args.model, resolve_device(args.device))
    judged = {"model": str(args.model) if args.model else "esd-testbed (shipped)", "weights": None}
    if args.weights is not None:
        apply_esd_weights(pipe, args.weights)
        judged |= {"weights": str(Path(args.weights).resolve()), "weights_sha256": sha256_file(args.weights)}
    m = evaluate_testbed(
        pipe,
        args.output,
        erased=args.erased,
        seeds_per_prompt=(FULL if args.full else QUICK)[0] if args.seeds is None else args.seeds,
        steps=(FULL if args.full else QUICK)[1] if args.steps is None else args.steps,
        guidance=args.guidance,
        classifier_path=args.classifier,
        prompt_set=args.prompt_set,
        judged=judged,
    )
    print(summary_lines(m, args.weights, Path(args.output) / "metrics.json"))
    return 0


def summary_lines(m: dict, weights: str | None, path: Path) -> str:
    """The evaluation in words: the erased concept first (what the user asked about), then everything else."""
    judged = f"judged {weights}" if weights else "judged the base model (no --weights)"
    protocol = {QUICK: f"the quick protocol; --full for {FULL[0]} seeds x {FULL[1]} steps", FULL: "the full protocol"}.get(
        (m["seeds_per_prompt"], m["steps"]), "a protocol of its own")
    lines = [f"{judged}: {m['n_images']} images ({m['seeds_per_prompt']} seeds × {m['steps']} steps, {protocol})"]
    if m["erased"] is not None:
        lines.append(f"erased '{m['erased']}': still drawn in {m['erased_rate']:.1%} of the images of prompts naming it "
                     "(lower is better)")
        lines.append(f"other {m['erased_kind']}s kept: {m['others_mean_accuracy']:.1%} on average "
                     f"(lowest {m['others_min_accuracy']:.1%})")
        kept = ", ".join(f"{w} {a:.1%}" for w, a in m["per_concept"].items() if w != m["erased"])
        lines.append(f"every other concept, on the prompts that do not name '{m['erased']}': {kept}")
    else:
        lines.append(", ".join(f"{kind} accuracy {m[f'{kind}_accuracy']:.1%}" for kind in ("shape", "colour", "style")))
    return "\n".join(lines + [f"-> {path}"])
