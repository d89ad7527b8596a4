"""Reading a results folder back: one pyarrow scan over many Parquet files, written by any bench version (columns
added since are filled with nulls, a file that cannot be read is skipped and named), and folding a finished run's
files into one run file (`compact`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from bench.atomic import atomic_parquet
from bench.errors import ResultsError
from bench.result import CELL_SCHEMA, EPOCH_SCHEMA

REQUIRED = ("run_id", "suite", "cell_id", "status", "model")

RUN_FILE = ".run.parquet"  # a compacted run: every row of one run in `<run_id>.run.parquet`, beside loose cell files
_SCHEMAS = {"cells": CELL_SCHEMA, "epochs": EPOCH_SCHEMA}
_REQUIRED = {"cells": REQUIRED, "epochs": ("run_id", "cell_id", "epoch")}
# A row's identity. A row found twice (a compaction cut short between its write and its deletes) is kept once.
_KEYS = {"cells": ("suite", "cell_id", "run_id"), "epochs": ("suite", "cell_id", "run_id", "epoch")}
_SCAN_CHUNK = 256  # files per dataset scan


def parquet_files(folder: Path) -> list[Path]:
    """Finished files only: a write interrupted by a kill leaves a hidden temporary file (bench/atomic.py), never
    a row."""
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(".")) if folder.is_dir() else []


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


def files(folders: list[Path], kind: str, runs: set[str] | None = None) -> list[Path]:
    paths = [p for folder in folders for p in parquet_files(folder / kind)]
    return paths if runs is None else [p for p in paths if _run_of(p) in runs or _run_of(p) is None]


def loose_by_run(folder: Path) -> dict[str, list[Path]]:
    by_run: dict[str, list[Path]] = {}
    for path in parquet_files(folder):
        if "--" in path.name:
            by_run.setdefault(_run_of(path), []).append(path)
    return by_run


def read_rows(paths: list[Path], kind: str, columns: Iterable[str] | None, problems: list[str],
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


def fold_run(folder: Path, run_id: str, loose: list[Path], kind: str, done: Compaction) -> None:
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
    atomic_parquet(merged, target)
    if pq.read_metadata(target).num_rows != merged.num_rows:
        raise ResultsError(f"{target}: the compacted file does not hold all {merged.num_rows} rows; the loose files are kept")
    for path in used:
        if path != target:
            path.unlink()
            done.files += 1
    done.runs += kind == "cells"
