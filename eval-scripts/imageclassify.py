"""The 2023 `eval-scripts/imageclassify.py` command line, on `esd.evaluate.classify` (torchvision ResNet-50).

    python eval-scripts/imageclassify.py --folder_path images/esd-church --prompts_path data/imagenette.csv

Writes the prompt CSV's columns plus `category_topK`, `index_topK`, `scores_topK` for every image, as in
2023. Differences, on purpose: --classifier loads local ResNet-50 weights (offline use), --device defaults
to auto, the output has a `file` column, and the ResNet-50 weights are named (IMAGENET1K_V2, what 2023's
`DEFAULT` meant).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from esd.errors import EsdError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="imageclassify.py", description="ImageNet ResNet-50 top-k of a folder of images")
    p.add_argument("--folder_path", required=True, help="folder of {case_number}_{k}.png images")
    p.add_argument("--prompts_path", required=True, help="prompt CSV whose columns are copied into the result")
    p.add_argument("--save_path", default=None, help="result CSV (default: FOLDER/<name>_classification.csv)")
    p.add_argument("--device", default="auto")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--classifier", default=None, help="local torchvision ResNet-50 state dict (default: download)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from esd.evaluate.classify import imagenet_categories, load_resnet50, top_k
    from esd.evaluate.generate import read_prompts
    from esd.evaluate.images import folder_images, load_images
    from esd.models import resolve_device

    a = parse_args(argv)
    folder = Path(a.folder_path)
    save = Path(a.save_path or folder / f"{folder.resolve().name}_classification.csv")
    try:
        read_prompts(a.prompts_path)  # validates the columns
        paths = folder_images(folder, "--folder_path")
        model = load_resnet50(a.classifier, resolve_device(a.device))
        probs, indices = top_k(model, load_images(paths), a.topk, a.batch_size)
    except EsdError as err:
        print(f"imageclassify.py: error: {err}", file=sys.stderr)
        return 2
    with open(a.prompts_path, newline="", encoding="utf-8") as f:
        prompts = {str(r["case_number"]).strip(): r for r in csv.DictReader(f)}
    columns = list(next(iter(prompts.values())).keys())
    names = imagenet_categories()
    ks = range(1, a.topk + 1)
    with save.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", *columns, *(f"{w}_top{k}" for k in ks for w in ("category", "index", "scores"))])
        for path, p, i in zip(paths, probs.tolist(), indices.tolist(), strict=True):
            row = prompts.get(path.stem.split("_")[0], {})
            tops = [v for k in range(a.topk) for v in (names[i[k]], i[k], p[k])]
            writer.writerow([path.name, *(row.get(c, "") for c in columns), *tops])
    print(f"wrote {save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
