"""Where the testbed and data/ are found: the checkout's folders, $ESD_TESTBED, clear errors.

The installed-wheel side (esd/_data/ inside site-packages) is checked end to end by .ci/wheel-check.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from esd import shipped
from esd.errors import EsdError

ROOT = Path(__file__).resolve().parents[1]


def test_a_checkout_reads_its_own_folders(monkeypatch):
    from esd.evaluate.prompts import DATA_DIR
    from esd.models import TESTBED

    monkeypatch.delenv(shipped.TESTBED_ENV, raising=False)
    assert shipped.in_checkout()
    assert shipped.shipped_path("models/testbed") == ROOT / "models" / "testbed" == shipped.testbed_path()
    assert DATA_DIR == ROOT / "data"
    if not os.environ.get(shipped.TESTBED_ENV):  # as the suite was started
        assert TESTBED == ROOT / "models" / "testbed"


def test_esd_testbed_names_the_folder_and_errors_name_it(monkeypatch, tmp_path):
    monkeypatch.setenv(shipped.TESTBED_ENV, str(tmp_path))
    assert shipped.testbed_path() == tmp_path
    with pytest.raises(EsdError, match=rf"ESD_TESTBED={tmp_path}: no testbed there"):
        shipped.check_testbed(tmp_path)
    monkeypatch.delenv(shipped.TESTBED_ENV)
    with pytest.raises(EsdError, match="pass --model .* or set ESD_TESTBED"):
        shipped.check_testbed(tmp_path)
    assert shipped.check_testbed(ROOT / "models" / "testbed") == ROOT / "models" / "testbed"


def test_command_without_model_reports_a_wrong_esd_testbed(tmp_path):
    env = {**os.environ, shipped.TESTBED_ENV: str(tmp_path / "nothing-here"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "esd.cli", "generate", "--prompt", "a circle", "--output",
                           str(tmp_path / "out"), "--device", "cpu"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert "esd generate: error: ESD_TESTBED=" in done.stderr and "no testbed there" in done.stderr
