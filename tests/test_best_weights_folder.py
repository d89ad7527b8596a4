"""The best epoch's weights live in a temporary folder; a cell killed outright leaves it behind, and the next cell
on the machine removes it, never a live cell's folder and never one an older bench left (no lock in it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from torch import nn

from bench.train.fit import BestWeights

HOLD = """
import sys, time
from torch import nn
from bench.train.fit import BestWeights
keeper = BestWeights(nn.Linear(2, 2))
keeper.keep(0)
print(keeper.file.parent, flush=True)
time.sleep(600)
"""


def _holder(tmp: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp)})
    folder = Path(proc.stdout.readline().strip())
    assert (folder / "best.pt").is_file() and folder.parent == tmp
    return proc, folder


def test_a_killed_cells_folder_goes_and_a_live_ones_stays(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    killed, orphan = _holder(tmp_path)
    alive, living = _holder(tmp_path)
    older = tmp_path / "bench-best-olderbench"  # what a bench before the lock left: not provably dead, kept
    older.mkdir()
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        assert orphan.is_dir()  # SIGKILL ran no cleanup
        keeper = BestWeights(nn.Linear(2, 2))
        try:
            assert not orphan.exists()
            assert living.is_dir() and (living / "best.pt").is_file()
            assert older.is_dir()
            assert keeper.file.parent.is_dir()
        finally:
            keeper.close()
        assert not keeper.file.parent.exists()
    finally:
        alive.kill()
        alive.wait(timeout=30)
