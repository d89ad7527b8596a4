"""Results on disk: the Parquet schema, atomic per-cell writes, and reading runs back as DataFrames.

Layout under the results folder (one file per cell and run, so nothing is ever rewritten):

    <results>/<suite>/cells/<cell_id>--<run_id>.parquet    one row: the cell's config, metrics, provenance
    <results>/<suite>/epochs/<cell_id>--<run_id>.parquet   one row per epoch (or throughput window)
    <results>/<suite>/logs/<cell_id>--<run_id>.log         the worker's stderr

`bench compact` folds a finished run's files into `<results>/<suite>/cells/<run_id>.run.parquet` (and the same
under epochs/), so a long history reads as one file per run; readers treat both forms alike (bench/scan.py reads
and folds; this module says where things are and writes them).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa

from bench.atomic import atomic_parquet, atomic_write
from bench.errors import ResultsError
from bench.result import CELL_SCHEMA, EPOCH_SCHEMA
from bench.scan import Compaction, files, fold_run, loose_by_run, read_rows

STATUSES = ("ok", "oom", "killed", "timeout", "error", "unavailable")

# The schema is derived from the typed result (bench/result.py); this name-to-type view is for readers.
CELL_COLUMNS: dict[str, pa.DataType] = dict(zip(CELL_SCHEMA.names, CELL_SCHEMA.types))
EPOCH_COLUMNS: dict[str, pa.DataType] = dict(zip(EPOCH_SCHEMA.names, EPOCH_SCHEMA.types))


@dataclass
class Results:
    """Everything read back from a results folder; `problems` names files that were skipped."""

    cells: pd.DataFrame
    epochs: pd.DataFrame
    problems: list[str] = field(default_factory=list)


class ResultStore:
    """One results folder. Writes are atomic per cell; reads never fail on one bad file."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _file(self, kind: str, suite: str, cell_id: str, run_id: str, ext: str = "parquet") -> Path:
        return self.root / suite / kind / f"{cell_id}--{run_id}.{ext}"

    def log_path(self, suite: str, cell_id: str, run_id: str) -> Path:
        path = self._file("logs", suite, cell_id, run_id, "log")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def done_cell_ids(self, suite: str) -> set[str]:
        """Cell ids that already have a row. An `unavailable` row does not count: its fix (a download)
        lies outside the cell, so the next run tries the cell again. Unreadable files do not count either;
        rows in a compacted run file count like loose cell files."""
        rows = read_rows(files([self.root / suite], "cells"), "cells", ["status"], [])
        return set(rows.loc[rows["status"] != "unavailable", "cell_id"]) if not rows.empty else set()

    def state_dir(self, suite: str, cell_id: str) -> Path:
        """Where a cell's saved state lives between its segments (bench/train/checkpoint.py writes it)."""
        return self.root / suite / "state" / cell_id

    def saved_state(self, suite: str, cell_id: str) -> dict | None:
        """The meta.json of a cell's saved state (epochs done, epoch rows, timing), or None without a usable one."""
        try:
            meta = json.loads((self.state_dir(suite, cell_id) / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) and isinstance(meta.get("loop"), dict) else None

    def race_log(self, suite: str) -> Path:
        """A race's decisions so far (bench/race.py): the cut at each rung, so a resumed race never cuts twice."""
        return self.root / suite / "state" / "race.json"

    def latest_epochs(self, suite: str, cell_ids: Iterable[str]) -> dict[str, list[dict]]:
        """The epoch table of each cell's newest row (by finish time, then run id)."""
        wanted = set(cell_ids)
        read = self.read(suites=[suite], columns=["finished_at"])
        cells = read.cells
        if cells.empty or read.epochs.empty:
            return {}
        cells = cells[cells["cell_id"].isin(wanted)].sort_values(["finished_at", "run_id"], na_position="first")
        newest = dict(zip(cells["cell_id"], cells["run_id"]))
        epochs = read.epochs[read.epochs["cell_id"].isin(wanted)]
        out: dict[str, list[dict]] = {}
        for row in epochs.sort_values("epoch").to_dict("records"):
            if newest.get(row["cell_id"]) == row["run_id"]:
                out.setdefault(row["cell_id"], []).append(row)
        return out

    def clear_state(self, suite: str, cell_id: str) -> None:
        """Delete a cell's saved state: its row is written, ok or dropped."""
        shutil.rmtree(self.state_dir(suite, cell_id), ignore_errors=True)

    def keep_model(self, suite: str, cell_id: str, run_id: str, files: dict[str, bytes], mode: str,
                   val_top1: float | None) -> Path | None:
        """Keep a cell's trained model under `SUITE/models/`: every one as `CELL--RUN.*` (`all`), or only the one
        with the best validation top-1 so far as `best.*` (`best`, replaced atomically when a later cell beats it).
        Returns the weights file written, or None when the model was not kept."""
        folder = self.root / suite / "models"
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{cell_id}--{run_id}" if mode == "all" else "best"
        if mode == "best":
            previous = folder / "best.json"
            best = json.loads(previous.read_text()).get("val_top1_best") if previous.is_file() else None
            if val_top1 is None or (best is not None and val_top1 <= best):
                return None
        # The JSON last: a reader that finds it finds its weights beside it.
        for name in sorted(files, key=lambda n: n.endswith(".json")):
            atomic_write(folder / f"{stem}{Path(name).suffix}", lambda out, data=files[name]: out.write(data))
        return folder / f"{stem}.safetensors"

    def latest_statuses(self, suite: str) -> dict[str, str]:
        """Each recorded cell's status in its newest row (by finish time, then run id): what `--retry-failed`
        looks at, so a cell that failed once and then ran ok is not run again."""
        rows = read_rows(files([self.root / suite], "cells"), "cells", ["status", "finished_at"], [])
        if rows.empty:
            return {}
        rows = rows.sort_values(["finished_at", "run_id"], na_position="first", kind="stable")
        latest = rows.drop_duplicates("cell_id", keep="last")
        return dict(zip(latest["cell_id"], latest["status"]))

    def write(self, row: dict, epochs: list[dict]) -> Path:
        """Write one cell's row and its epoch table; the row is renamed into place last (it marks 'done')."""
        unknown = set(row) - set(CELL_COLUMNS)
        if unknown:
            raise ValueError(f"columns not in the results schema: {sorted(unknown)}")
        suite, cell_id, run_id = row["suite"], row["cell_id"], row["run_id"]
        epoch_rows = [{"run_id": run_id, "suite": suite, "cell_id": cell_id, **e} for e in epochs]
        atomic_parquet(pa.Table.from_pylist(epoch_rows, schema=EPOCH_SCHEMA), self._file("epochs", suite, cell_id, run_id))
        target = self._file("cells", suite, cell_id, run_id)
        atomic_parquet(pa.Table.from_pylist([row], schema=CELL_SCHEMA), target)
        return target

    def read(self, *, suites: Iterable[str] | None = None, runs: Iterable[str] | None = None,
             columns: Iterable[str] | None = None, epochs: bool = True) -> Results:
        """Every row of the folder, or only those of `suites` and `runs` (chosen by folder and file name before a
        file is opened), with only `columns` (the identity columns always): one pyarrow scan per table, whatever
        mix of compacted run files and loose cell files the folder holds. Bad files are skipped and named."""
        problems: list[str] = []
        folders = self._suite_folders(suites)
        runs = None if runs is None else set(runs)
        cells = read_rows(files(folders, "cells", runs), "cells", columns, problems, runs)
        epoch_rows = read_rows(files(folders, "epochs", runs), "epochs", None, problems, runs) if epochs else pd.DataFrame()
        return Results(cells=cells, epochs=epoch_rows, problems=problems)

    def compact(self) -> Compaction:
        """Fold every run's cell files, and its epoch files, into one file per run (`cells/RUN.run.parquet`),
        written atomically before the loose files go; every row is kept. It holds the folder's lock, so it never
        touches a run that is still going (it refuses while a `bench run` holds the folder)."""
        done = Compaction()
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(self.lock())
            except ResultsError:
                raise ResultsError(f"a bench run is writing to {self.root}; compact it after that run has finished") from None
            for folder in self._suite_folders(None):
                self._fold(folder, None, done)
        return done

    def compact_run(self, suite: str, run_id: str) -> Compaction:
        """Fold one finished run's files into its run file, as `compact` does; the caller holds the lock (a
        `bench run` does this when its run completes, so a long history stays quick to read)."""
        done = Compaction()
        self._fold(self.root / suite, run_id, done)
        return done

    @staticmethod
    def _fold(folder: Path, run: str | None, done: Compaction) -> None:
        for kind in ("cells", "epochs"):
            for run_id, loose in loose_by_run(folder / kind).items():
                if run is None or run_id == run:
                    fold_run(folder / kind, run_id, loose, kind, done)

    def _suite_folders(self, suites: Iterable[str] | None) -> list[Path]:
        if not self.root.is_dir():
            return []
        wanted = None if suites is None else set(suites)
        return sorted(p for p in self.root.iterdir() if p.is_dir() and (wanted is None or p.name in wanted))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for one `bench run`; a second run on it is refused, not interleaved."""
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ResultsError(
                f"another bench run is writing to {self.root}; wait for it to finish or pass a different --results folder"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
