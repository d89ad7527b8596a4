"""The code has no unused imports, undefined names or names exported that do not exist: ruff's pyflakes rules (F)
over the package, the benchmarks and the tests. A refactor that moves code leaves such things behind; this finds
them before a user's `from bench.report.plots import *` does."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")


@pytest.mark.skipif(RUFF is None, reason="ruff is not installed (pip install -e '.[dev]' has it)")
def test_pyflakes_rules_pass():
    done = subprocess.run([RUFF, "check", "--no-cache", "--select", "F", "bench", "benchmarks", "tests"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
