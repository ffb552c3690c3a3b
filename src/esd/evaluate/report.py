"""Human-readable results: one `Report` rendered as Markdown and HTML, and the image grids it shows.

A suite fills a `Report` (settings, tables, images); the same object renders to `report.md` and
`report.html`, so the two can never disagree. Grids put prompts in rows and seeds in columns; with a
reference model, `side_by_side` shows its images next to the evaluated model's for the same prompt and seed.
The grids themselves are built by `esd.grids.make_grid`.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from esd.grids import CELL, beside, make_grid
from esd.weights import atomic_path


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list]


@dataclass
class Report:
    title: str
    settings: dict = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    images: list[tuple[str, str]] = field(default_factory=list)  # (caption, path relative to the report)
    notes: list[str] = field(default_factory=list)


def fmt(value) -> str:
    """Numbers to 4 significant digits, None as a dash, everything else as text."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def to_markdown(report: Report) -> str:
    """The report as Markdown: a settings table, the result tables, notes, then the images."""
    lines = [f"# {report.title}", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {_md_cell(fmt(v))} |" for k, v in report.settings.items()]
    for table in report.tables:
        lines += ["", f"## {table.title}", "", "| " + " | ".join(table.headers) + " |",
                  "|" + "---|" * len(table.headers)]
        lines += ["| " + " | ".join(_md_cell(fmt(c)) for c in row) + " |" for row in table.rows]
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report.notes]
    for caption, path in report.images:
        lines += ["", f"## {caption}", "", f"![{caption}]({path})"]
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_html(report: Report) -> str:
    """The report as a standalone HTML page (images linked by relative path)."""
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(report.title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}img{max-width:100%;"
             "image-rendering:pixelated}</style></head><body>", f"<h1>{e(report.title)}</h1>"]
    parts.append(_html_table(["setting", "value"], [[k, v] for k, v in report.settings.items()]))
    for table in report.tables:
        parts += [f"<h2>{e(table.title)}</h2>", _html_table(table.headers, table.rows)]
    if report.notes:
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{e(n)}</li>" for n in report.notes] + ["</ul>"]
    for caption, path in report.images:
        parts += [f"<h2>{e(caption)}</h2>", f"<img src='{e(path)}' alt='{e(caption)}'>"]
    return "\n".join(parts + ["</body></html>"]) + "\n"


def _html_table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(report: Report, folder: str | Path) -> tuple[Path, Path]:
    """Write report.md and report.html atomically."""
    folder = Path(folder)
    written = []
    for name, text in (("report.md", to_markdown(report)), ("report.html", to_html(report))):
        with atomic_path(folder / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written.append(folder / name)
    return written[0], written[1]


def image_grid(rows: list[list[Path]], cell: int = CELL) -> Image.Image:
    """Rows of image files as one picture, each image scaled to `cell` x `cell`; short rows end blank."""
    cols = max(len(r) for r in rows)
    images: list[Image.Image | None] = []
    for paths in rows:
        for path in paths:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        images += [None] * (cols - len(paths))
    return make_grid(images, cols, cell=cell)


def side_by_side(left: list[list[Path]], right: list[list[Path]], cell: int = CELL) -> Image.Image:
    """Two grids of the same prompts and seeds next to each other, with a gap between them."""
    return beside(image_grid(left, cell), image_grid(right, cell))


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Save a PNG atomically (a killed run leaves no truncated picture behind)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
