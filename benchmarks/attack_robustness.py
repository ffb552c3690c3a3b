"""Does an erased concept come back? Erase on several seeds, attack each erased model, tabulate the ASR.

    python benchmarks/attack_robustness.py --concept circle --erase-seeds 0,1,2 --output outputs/bench-attack \
        [--attacks unlearndiff,textual-inversion] [--erase-flags="--robust"] [--attack-flags="--prompts 12"]

For each erase seed: `esd erase --concept C --seed S` (flags not given take the testbed's recommendation, as the
command does; --erase-flags adds to them, e.g. "--robust"), then `esd attack` with each attack against the
erased weights. The real commands run as subprocesses, so this measures exactly what a user runs. Each run's
folder is kept: a re-run resumes or skips what is done (an erase that finished is not repeated; an attack resumes
from the prompts it finished). Prints, and writes to OUTPUT/table.md, asr_before / asr_after per attack and seed,
with each erase's and attack's wall time.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path


def run(cmd: list[str]) -> float:
    """Run one `esd` command; its wall time in seconds."""
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def erase_once(concept: str, seed: int, folder: Path, flags: list[str]) -> float | None:
    """Erase unless `folder` already holds finished weights; the erase's seconds (None when skipped)."""
    if (folder / "esd.safetensors").is_file() and not any(folder.glob("checkpoint-*")):
        return None
    return run(["esd", "erase", "--concept", concept, "--seed", str(seed), "--output", str(folder),
                "--grid-steps", "0", *flags])


def attack_once(attack: str, concept: str, weights: Path, folder: Path, flags: list[str]) -> dict:
    seconds = None
    if not (folder / "metrics.json").is_file():
        seconds = run(["esd", "attack", "--attack", attack, "--concept", concept, "--weights", str(weights),
                       "--output", str(folder), *flags])
    metrics = json.loads((folder / "metrics.json").read_text())
    return {"asr_before": metrics["asr_before"], "asr_after": metrics["asr_after"],
            "asr_without_concept": metrics.get("asr_without_concept"), "seconds": seconds,
            "n_images": metrics.get("n_images")}


def table(rows: list[dict], attacks: list[str]) -> str:
    head = "| erase seed | erase s | " + " | ".join(
        f"{a}: before | {a}: after | {a}: s" for a in attacks) + " |"
    lines = [head, "|" + "---|" * (2 + 3 * len(attacks))]
    for r in rows:
        cells = []
        for a in attacks:
            m = r["attacks"][a]
            s = "resumed" if m["seconds"] is None else f"{m['seconds']:.0f}"
            cells += [f"{m['asr_before']:.1%}", f"{m['asr_after']:.1%}", s]
        erase_s = "done before" if r["erase_s"] is None else f"{r['erase_s']:.0f}"
        lines.append(f"| {r['seed']} | {erase_s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concept", required=True)
    p.add_argument("--erase-seeds", default="0,1,2")
    p.add_argument("--attacks", default="unlearndiff,textual-inversion")
    p.add_argument("--erase-flags", default="", help="extra `esd erase` flags, one string: --erase-flags=\"--robust\"")
    p.add_argument("--attack-flags", default="", help="extra `esd attack` flags, one string")
    p.add_argument("--output", required=True, help="folder of every erase and attack run, and table.md")
    args = p.parse_args()
    out = Path(args.output)
    attacks = args.attacks.split(",")
    rows = []
    for seed in (int(s) for s in args.erase_seeds.split(",")):
        folder = out / f"seed-{seed}"
        erase_s = erase_once(args.concept, seed, folder / "erase", shlex.split(args.erase_flags))
        row = {"seed": seed, "erase_s": erase_s, "attacks": {}}
        for attack in attacks:
            row["attacks"][attack] = attack_once(attack, args.concept, folder / "erase" / "esd.safetensors",
                                                 folder / attack, shlex.split(args.attack_flags))
        print(json.dumps(row), flush=True)
        rows.append(row)
    text = table(rows, attacks)
    print(text)
    (out / "table.md").write_text(f"`{shlex.join(sys.argv)}`\n\n{text}\n")
    (out / "rows.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
