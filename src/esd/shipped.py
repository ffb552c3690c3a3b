"""Where the files the project ships outside `src/` are: the testbed (`models/testbed/`) and `data/`.

Both live at the repository's root, where users and the docs point to them. A wheel (or a non-editable
`pip install .`) has no repository around it, so the build copies both into the package, under the
same relative paths below `esd/_data/` (setup.py's `build_py`). Code asks `shipped_path` and gets the
checkout's folder in a source checkout (an editable install included) and the installed copy otherwise.

The testbed can also be named explicitly: `ESD_TESTBED=/some/folder` wins over both.
"""

from __future__ import annotations

import os
from pathlib import Path

from esd.errors import EsdError

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parents[1]
INSTALLED_DATA = PACKAGE_DIR / "_data"  # filled by setup.py's build_py (its SHIPPED_FOLDERS); absent in a checkout
TESTBED_ENV = "ESD_TESTBED"


def in_checkout() -> bool:
    """True when this package is imported from a source checkout's src/esd/ (not from site-packages)."""
    return PACKAGE_DIR == REPO_ROOT / "src" / "esd" and (REPO_ROOT / "pyproject.toml").is_file()


def shipped_path(relative: str) -> Path:
    """A shipped folder (`models/testbed`, `data`): the checkout's own, else the copy installed with the package."""
    return (REPO_ROOT if in_checkout() else INSTALLED_DATA) / relative


def testbed_path() -> Path:
    """The testbed folder: $ESD_TESTBED if set, else the shipped one (which need not exist; see `check_testbed`)."""
    named = os.environ.get(TESTBED_ENV, "").strip()
    return Path(named).expanduser() if named else shipped_path("models/testbed")


def check_testbed(path: Path) -> Path:
    """`path` if it holds a diffusers pipeline (model_index.json); else an error that says how to point at one."""
    if (path / "model_index.json").is_file():
        return path
    if os.environ.get(TESTBED_ENV, "").strip():
        raise EsdError(f"{TESTBED_ENV}={os.environ[TESTBED_ENV]}: no testbed there (no model_index.json in "
                       f"{path}); point {TESTBED_ENV} at a testbed folder, or unset it to use the shipped one")
    raise EsdError(f"no --model given and the testbed is missing at {path}; pass --model (a Hugging Face id, a "
                   f"diffusers folder or a .ckpt/.safetensors file) or set {TESTBED_ENV} to a testbed folder")
