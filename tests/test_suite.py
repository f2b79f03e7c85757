"""The suite's own promise: in CI (CI=true) a skipped test fails the run; elsewhere it is a one-line skip."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("ci,outcome", [("", "1 passed, 1 skipped"), ("true", "1 failed, 1 passed")])
def test_a_skip_fails_only_in_ci(tmp_path, ci, outcome):
    (tmp_path / "conftest.py").write_text((HERE / "conftest.py").read_text())
    (tmp_path / "test_offline.py").write_text("import pytest\n\ndef test_needs_network():\n    pytest.skip('no network')\n\n"
                                              "def test_local():\n    pass\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
                         capture_output=True, text=True, env={**os.environ, "CI": ci})
    assert outcome in run.stdout, run.stdout
    assert (run.returncode != 0) == (ci == "true")
    assert ("skipped in CI, where every test must run" in run.stdout) == (ci == "true")
