"""Build hook: a wheel carries the testbed (models/testbed/) and data/ inside the package.

Everything else about the package is in pyproject.toml. The two folders stay at the repository's root,
where users and the docs find them; a wheel has no repository around it, so `build_py` copies them to
`esd/_data/<same relative path>`, where `esd.shipped` looks when the package is not a source checkout.
An editable install gets no copy: it reads the checkout's folders directly.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# The same list as esd.shipped.SHIPPED_FOLDERS (not imported: the build must not import the package).
SHIPPED_FOLDERS = ("models/testbed", "data")


class BuildPyWithShippedFolders(build_py):
    """build_py, plus a copy of each shipped folder under esd/_data/ in the build tree."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # the checkout's own folders are used
            return
        for relative in SHIPPED_FOLDERS:
            source, target = ROOT / relative, Path(self.build_lib) / "esd" / "_data" / relative
            if not source.is_dir():
                raise SystemExit(f"setup.py: {source} is missing; a wheel without it would not find it either")
            shutil.rmtree(target, ignore_errors=True)  # a stale copy from an earlier build must not linger
            shutil.copytree(source, target, ignore=shutil.ignore_patterns(".*", "__pycache__", "*.tmp"))


setup(cmdclass={"build_py": BuildPyWithShippedFolders})
