"""bench/atomic.py: every file bench keeps is written whole or not at all, and gets the mode any new file gets."""

import os
import stat

import pytest

from bench.atomic import atomic_text, atomic_write


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "rows.json"
    atomic_text(target, "old")

    def half_then_fail(out):
        out.write(b"half")
        raise RuntimeError("killed midway")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_the_file_gets_the_umasks_mode_not_a_private_one(tmp_path, umask):
    """A shared results folder or image cache stays readable by the others the umask lets read it (mkstemp
    would make every file 0600, its writer's alone)."""
    before = os.umask(umask)
    try:
        atomic_text(tmp_path / "cache.json", "{}", sync=False)
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "cache.json").stat().st_mode) == 0o666 & ~umask
