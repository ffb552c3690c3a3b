"""The 2023 `eval-scripts/lpips_eval.py` command line, on `esd.evaluate.lpips_score` (lpips, AlexNet).

    python eval-scripts/lpips_eval.py --original_path images/SD-V1-4 --edited_path images/esd-vangogh \
        --csv_path data/artists.csv --save_path results/

For each prompt row, the mean LPIPS between the images `{case_number}_{k}.png` of the two folders (same
prompt, same seed) goes into column `lpips_loss`; the CSV is written to
`SAVE_PATH/<edited folder name>_lpipsloss.csv` as in 2023. Differences, on purpose: images are compared at
their own resolution (2023 shrank them to 64 px first), a row without images gets an empty value instead
of 0, --lpips_backbone loads local AlexNet weights (offline use), and the style-loss `--image` mode is gone.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from esd.errors import EsdError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lpips_eval.py", description="LPIPS between two folders of same-seed images")
    p.add_argument("--original_path", required=True, help="images of the original model")
    p.add_argument("--edited_path", required=True, help="images of the edited model, same file names")
    p.add_argument("--csv_path", required=True, help="prompt CSV (case_number, prompt, evaluation_seed)")
    p.add_argument("--save_path", default=None, help="folder for the result CSV (default: print only)")
    p.add_argument("--lpips_backbone", default=None, help="local AlexNet state dict (default: torchvision download)")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from esd.evaluate.generate import read_prompts
    from esd.evaluate.images import folder_images, load_images
    from esd.evaluate.lpips_score import load_lpips, lpips_distances
    from esd.models import resolve_device

    a = parse_args(argv)
    try:
        rows = read_prompts(a.csv_path)
        edited = {p.name: p for p in folder_images(a.edited_path, "--edited_path")}
        original = {p.name: p for p in folder_images(a.original_path, "--original_path")}
        shared = sorted(set(edited) & set(original))
        model = load_lpips(a.lpips_backbone, resolve_device(a.device))
        dist = dict(zip(shared, lpips_distances(model, load_images([original[n] for n in shared]),
                                                load_images([edited[n] for n in shared])), strict=True))
    except EsdError as err:
        print(f"lpips_eval.py: error: {err}", file=sys.stderr)
        return 2
    per_case = {}
    for row in rows:
        scores = [d for n, d in dist.items() if n.startswith(f"{row.case_number}_")]
        per_case[row.case_number] = sum(scores) / len(scores) if scores else ""
        print(f"{row.case_number}: LPIPS {per_case[row.case_number]}")
    if a.save_path is not None:
        save = Path(a.save_path) / f"{Path(a.edited_path).resolve().name}_lpipsloss.csv"
        save.parent.mkdir(parents=True, exist_ok=True)
        with open(a.csv_path, newline="", encoding="utf-8") as f:
            table = list(csv.DictReader(f))
        with save.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, [*table[0].keys(), "lpips_loss"])
            writer.writeheader()
            for r in table:
                writer.writerow({**r, "lpips_loss": per_case.get(str(r["case_number"]).strip(), "")})
        print(f"wrote {save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
