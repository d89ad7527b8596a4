"""Files written whole or not at all: a temporary file beside the target, renamed into place (rename is atomic on
one file system), so a reader or a run killed halfway never sees half a file. Every file bench writes to keep goes
through here: result rows, a cell's saved state and kept weights, the image caches."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMPORARY = ".tmp"  # the suffix of a temporary file (its name starts with a dot too: scans never list it)


def atomic_write(target: Path, write: Callable[[BinaryIO], object], *, sync: bool = True) -> None:
    """Call `write(binary file)` on a temporary file beside `target`, then rename it into place; on any failure
    the temporary goes and `target` is as it was. `sync` fsyncs before the rename (a file meant to outlive a crash;
    a cache that can be rebuilt skips it). The file gets the mode the umask gives a new file (not mkstemp's 0600,
    which would make a shared results folder or image cache private to its writer)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMPORARY}")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as out:
            write(out)
            if sync:
                out.flush()
                os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_text(target: Path, text: str, *, sync: bool = True) -> None:
    """`text` as UTF-8, atomically."""
    atomic_write(target, lambda out: out.write(text.encode("utf-8")), sync=sync)


def atomic_parquet(table, target: Path) -> None:
    """A pyarrow table as a Parquet file, atomically and synced."""
    import pyarrow.parquet as pq

    atomic_write(target, lambda out: pq.write_table(table, out))
