"""Results on disk: the Parquet schema, atomic per-cell writes, and reading runs back as DataFrames.

Layout under the results folder (one file per cell and run, so nothing is ever rewritten):

    <results>/<suite>/cells/<cell_id>--<run_id>.parquet    one row: the cell's config, metrics, provenance
    <results>/<suite>/epochs/<cell_id>--<run_id>.parquet   one row per epoch (or throughput window)
    <results>/<suite>/logs/<cell_id>--<run_id>.log         the worker's stderr

`bench compact` folds a finished run's files into `<results>/<suite>/cells/<run_id>.run.parquet` (and the same
under epochs/), so a long history reads as one file per run; readers treat both forms alike.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from bench.errors import ResultsError
from bench.result import CELL_SCHEMA, EPOCH_SCHEMA

STATUSES = ("ok", "oom", "killed", "timeout", "error", "unavailable")

# The schema is derived from the typed result (bench/result.py); this name-to-type view is for readers.
CELL_COLUMNS: dict[str, pa.DataType] = dict(zip(CELL_SCHEMA.names, CELL_SCHEMA.types))
EPOCH_COLUMNS: dict[str, pa.DataType] = dict(zip(EPOCH_SCHEMA.names, EPOCH_SCHEMA.types))

REQUIRED = ("run_id", "suite", "cell_id", "status", "model")


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
        rows = _scan(_files([self.root / suite], "cells"), "cells", ["status"], [])
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
            _atomic_bytes(folder / f"{stem}{Path(name).suffix}", files[name])
        return folder / f"{stem}.safetensors"

    def latest_statuses(self, suite: str) -> dict[str, str]:
        """Each recorded cell's status in its newest row (by finish time, then run id): what `--retry-failed`
        looks at, so a cell that failed once and then ran ok is not run again."""
        rows = _scan(_files([self.root / suite], "cells"), "cells", ["status", "finished_at"], [])
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
        _atomic_parquet(pa.Table.from_pylist(epoch_rows, schema=EPOCH_SCHEMA), self._file("epochs", suite, cell_id, run_id))
        target = self._file("cells", suite, cell_id, run_id)
        _atomic_parquet(pa.Table.from_pylist([row], schema=CELL_SCHEMA), target)
        return target

    def read(self, *, suites: Iterable[str] | None = None, runs: Iterable[str] | None = None,
             columns: Iterable[str] | None = None, epochs: bool = True) -> Results:
        """Every row of the folder, or only those of `suites` and `runs` (chosen by folder and file name before a
        file is opened), with only `columns` (the identity columns always): one pyarrow scan per table, whatever
        mix of compacted run files and loose cell files the folder holds. Bad files are skipped and named."""
        problems: list[str] = []
        folders = self._suite_folders(suites)
        runs = None if runs is None else set(runs)
        cells = _scan(_files(folders, "cells", runs), "cells", columns, problems, runs)
        epoch_rows = _scan(_files(folders, "epochs", runs), "epochs", None, problems, runs) if epochs else pd.DataFrame()
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
            for run_id, loose in _loose_by_run(folder / kind).items():
                if run is None or run_id == run:
                    _fold_run(folder / kind, run_id, loose, kind, done)

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


def _parquet_files(folder: Path) -> list[Path]:
    """Finished files only: a write interrupted by a kill leaves a hidden .tmp- file, never a row."""
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(".")) if folder.is_dir() else []


def _atomic_bytes(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_parquet(table: pa.Table, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".parquet")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- reading: one scan over many files ----------------------------------------------------------------------

RUN_FILE = ".run.parquet"  # a compacted run: every row of one run in `<run_id>.run.parquet`, beside loose cell files
_SCHEMAS = {"cells": CELL_SCHEMA, "epochs": EPOCH_SCHEMA}
_REQUIRED = {"cells": REQUIRED, "epochs": ("run_id", "cell_id", "epoch")}
# A row's identity. A row found twice (a compaction cut short between its write and its deletes) is kept once.
_KEYS = {"cells": ("suite", "cell_id", "run_id"), "epochs": ("suite", "cell_id", "run_id", "epoch")}
_SCAN_CHUNK = 256  # files per dataset scan


@dataclass
class Compaction:
    """What `ResultStore.compact` did: runs folded, loose files removed, files it left alone and why."""

    runs: int = 0
    files: int = 0
    problems: list[str] = field(default_factory=list)


def _run_of(path: Path) -> str | None:
    """The run id a file's name gives: `CELL--RUN.parquet` or a compacted `RUN.run.parquet` (None: neither)."""
    name = path.name
    if "--" in name:
        return name[: -len(".parquet")].split("--", 1)[1]
    return name[: -len(RUN_FILE)] if name.endswith(RUN_FILE) else None


def _files(folders: list[Path], kind: str, runs: set[str] | None = None) -> list[Path]:
    paths = [p for folder in folders for p in _parquet_files(folder / kind)]
    return paths if runs is None else [p for p in paths if _run_of(p) in runs or _run_of(p) is None]


def _loose_by_run(folder: Path) -> dict[str, list[Path]]:
    by_run: dict[str, list[Path]] = {}
    for path in _parquet_files(folder):
        if "--" in path.name:
            by_run.setdefault(_run_of(path), []).append(path)
    return by_run


def _scan(paths: list[Path], kind: str, columns: Iterable[str] | None, problems: list[str],
          runs: set[str] | None = None) -> pd.DataFrame:
    """The rows of these files as one DataFrame: identity columns first kept, duplicates dropped, sorted by cell."""
    schema, key = _SCHEMAS[kind], list(_KEYS[kind])
    wanted = None if columns is None else [c for c in dict.fromkeys([*key, *_REQUIRED[kind], *columns]) if c in schema.names]
    tables = _scan_tables(paths, schema, _REQUIRED[kind], wanted, problems) if paths else []
    frames = [t.to_pandas() for t in tables if t.num_rows]
    if not frames:
        return pd.DataFrame()
    rows = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if runs is not None:
        rows = rows[rows["run_id"].isin(runs)]
    key = [c for c in key if c in rows.columns]
    return rows.drop_duplicates(key).sort_values(key, kind="stable").reset_index(drop=True)


def _scan_tables(paths: list[Path], schema: pa.Schema, required: tuple[str, ...], wanted: list[str] | None,
                 problems: list[str]) -> list[pa.Table]:
    """One dataset scan in the schema (older files lack newer columns: they come back null). Should a file be
    unreadable or hold a column of another type, find it by its footer and read the odd ones one by one."""
    try:
        return [_dataset_scan(paths, schema, required, wanted, problems)]
    except (OSError, pa.ArrowException):
        pass
    fitting, odd = [], []
    for path in paths:
        try:
            file_schema = pq.read_schema(path)
        except (OSError, pa.ArrowException) as exc:
            problems.append(f"{path}: not a readable Parquet file ({exc.__class__.__name__}); delete or move it")
            continue
        (fitting if _fits(file_schema, schema) else odd).append(path)
    tables = []
    if fitting:
        try:
            tables.append(_dataset_scan(fitting, schema, required, wanted, problems))
        except (OSError, pa.ArrowException):
            odd = fitting + odd  # a damaged page behind a good footer: one file at a time finds it
    return tables + [t for path in odd if (t := _read_one(path, required, wanted, problems)) is not None]


def _dataset_scan(paths: list[Path], schema: pa.Schema, required: tuple[str, ...], wanted: list[str] | None,
                  problems: list[str]) -> pa.Table:
    tables, foreign = [], {}
    # A dataset keeps every file's decoded footer (about 0.5 MB each for a cell file's ~130 columns) until it is
    # dropped, and a one-row batch holds a buffer per column: scanning loose files a few hundred at a time and
    # packing each chunk into contiguous columns bounds the memory. A compacted folder is one chunk.
    for start in range(0, len(paths), _SCAN_CHUNK):
        dataset = ds.dataset([str(p) for p in paths[start:start + _SCAN_CHUNK]], schema=schema, format="parquet")
        scanner = dataset.scanner(columns=wanted)
        batches = []
        for tagged in scanner.scan_batches():
            batch = tagged.record_batch
            # A bench file always fills its identity columns; null ones mean the file lacks them.
            if batch.num_rows and any(batch.column(c).null_count for c in required):
                names = tagged.fragment.physical_schema.names
                foreign[tagged.fragment.path] = [c for c in required if c not in names] or list(required)
                continue
            batches.append(batch)
        tables.append(pa.Table.from_batches(batches, schema=scanner.projected_schema).combine_chunks())
    problems.extend(f"{path}: not a bench results file (no {', '.join(missing)} column); move it out of the results folder"
                    for path, missing in foreign.items())
    return pa.concat_tables(tables)


def _fits(file_schema: pa.Schema, schema: pa.Schema) -> bool:
    """Whether the scan can read this file in the schema: every shared column of the same type (numbers cast)."""
    for f in file_schema:
        if f.name not in schema.names:
            continue
        want = schema.field(f.name).type
        if not (f.type == want or pa.types.is_null(f.type) or (_numeric(f.type) and _numeric(want))):
            return False
    return True


def _numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def _read_one(path: Path, required: tuple[str, ...], wanted: list[str] | None, problems: list[str]) -> pa.Table | None:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        problems.append(f"{path}: not a readable Parquet file ({exc.__class__.__name__}); delete or move it")
        return None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        problems.append(f"{path}: not a bench results file (no {', '.join(missing)} column); move it out of the results folder")
        return None
    return table if wanted is None else table.select([c for c in wanted if c in table.column_names])


# --- compaction -------------------------------------------------------------------------------------------------


def _fold_run(folder: Path, run_id: str, loose: list[Path], kind: str, done: Compaction) -> None:
    """Fold one run's loose files (and its earlier run file, if a compaction was cut short) into its run file."""
    target = folder / f"{run_id}{RUN_FILE}"
    tables, used = [], []
    for path in ([target] if target.exists() else []) + loose:
        problems: list[str] = []
        table = _read_one(path, _REQUIRED[kind], None, problems)
        if table is None:
            done.problems += [f"{p} (left as it is)" for p in problems]
            continue
        tables.append(table)
        used.append(path)
    if not [p for p in used if p != target]:
        return
    try:
        merged = pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException as exc:
        done.problems.append(f"{folder}: run {run_id}: its files disagree on column types ({exc}); left as they are")
        return
    key = [c for c in _KEYS[kind] if c in merged.column_names]
    first = ~merged.select(key).to_pandas().duplicated().to_numpy()
    merged = merged.filter(pa.array(first)).sort_by([(c, "ascending") for c in key])
    _atomic_parquet(merged, target)
    if pq.read_metadata(target).num_rows != merged.num_rows:
        raise ResultsError(f"{target}: the compacted file does not hold all {merged.num_rows} rows; the loose files are kept")
    for path in used:
        if path != target:
            path.unlink()
            done.files += 1
    done.runs += kind == "cells"
