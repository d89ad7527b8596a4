"""A run: which cells, resume, the results folder's lock, and recording every cell's outcome as a row.

Where the cells run is an executor's business (`bench/executors/`: this machine's devices, Ray, SLURM), and how
one cell's process runs and ends is `bench/cellproc.py`'s; the runner only turns their outcomes into rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from bench import cellproc, executors, status, tracking
from bench.cellproc import Job, Outcome
from bench.errors import SuiteError, close_matches
from bench.result import CellResult, Identity
from bench.store import ResultStore
from bench.suite import Cell, RaceSpec, Suite, field_matches


@dataclass(frozen=True)
class RunOptions:
    """How to run a suite; none of this changes what a cell is."""

    results: Path = Path("results")
    data_root: Path | None = None
    devices: tuple[str, ...] = ("cpu",)
    rerun: bool = False
    retry_failed: bool = False  # run only the cells whose newest row did not end ok
    only: str | None = None
    max_cells: int | None = None
    cell_timeout_s: float | None = None
    max_host_bytes: int | None = None
    download: bool = True
    ray: str | None = None  # a Ray address ("auto", "ray://host:10001") or "local": run cells as Ray tasks
    slurm: str | None = None  # a SLURM partition ("" the cluster's default; "local": submitit's local executor)
    race: RaceSpec | None = None  # race the suite's configs (its own `race:` when None)
    tracker: tracking.Tracker | None = None  # also log each finished cell there (MLflow), after its row is written
    # dataset -> the side its image-folder images are stored at; run_suite fills it from the whole suite
    stored_resolutions: dict[str, int] = field(default_factory=dict)


@dataclass
class RunSummary:
    run_id: str
    rows: list[dict] = field(default_factory=list)
    skipped: int = 0


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def matches(cell: Cell, pattern: str) -> bool:
    """`--only`: a glob on the cell id or model name, or `field=value` with the value read as YAML (resolution=32,
    pretrained=true, model=resnet18: model names match as in a suite's `exclude`)."""
    if "=" in pattern:
        key, value = _only_field(pattern)
        return field_matches(cell.model_dump()[key], value)
    bare = cell.model.split(":", 1)[-1]
    return any(fnmatch.fnmatchcase(s, pattern) for s in (cell.id, cell.model, bare))


def _only_field(pattern: str) -> tuple[str, object]:
    key, _, text = pattern.partition("=")
    key = key.strip()
    if key not in Cell.model_fields:
        raise SuiteError(f"--only {pattern}: cells have no field {key!r}{close_matches(key, Cell.model_fields)}; "
                         f"use FIELD=VALUE with a suite field such as resolution=32, or a glob on the cell id or model")
    try:
        return key, yaml.safe_load(text.strip())
    except yaml.YAMLError:
        return key, text.strip()


def only_cells(cells: list[Cell], pattern: str | None) -> list[Cell]:
    """The cells `--only PATTERN` selects; an unknown field or a pattern that selects nothing is an error that
    lists what the suite holds."""
    if pattern is None:
        return list(cells)
    chosen = [c for c in cells if matches(c, pattern)]
    if not chosen and cells:
        key = _only_field(pattern)[0] if "=" in pattern else "model"
        present = sorted({str(c.model_dump()[key]) for c in cells})
        raise SuiteError(f"--only {pattern} matches none of the suite's {len(cells)} cells; their {key} values are "
                         f"{', '.join(present[:12])}{' ...' if len(present) > 12 else ''}")
    return chosen


def select(cells: list[Cell], store: ResultStore, suite: str, options: RunOptions) -> tuple[list[Cell], int]:
    """Cells to run, in suite order (of those `--only` matches): the ones without a row, every one with
    `--rerun`, or with `--retry-failed` the ones whose newest row is not ok. Returns them and how many of the
    matching cells were left out as done."""
    chosen = only_cells(cells, options.only)
    if options.retry_failed:
        latest = store.latest_statuses(suite)
        # a race's dropped cells are answers, not failures: only --rerun races them again
        wanted = [c for c in chosen if latest.get(c.id, status.OK) not in (status.OK, status.DROPPED)]
    elif options.rerun:
        wanted = chosen
    else:
        done = store.done_cell_ids(suite) - _resumable(chosen, store, suite)
        wanted = [c for c in chosen if c.id not in done]
    todo = wanted[: options.max_cells] if options.max_cells is not None else wanted
    return todo, len(chosen) - len(wanted)


def _resumable(cells: list[Cell], store: ResultStore, suite: str) -> set[str]:
    """Cells whose newest row says killed (a node lost, a preemption, the OOM killer) but whose state was saved:
    not done, the next run resumes them from their last saved epoch."""
    with_state = {c.id for c in cells if store.saved_state(suite, c.id) is not None}
    if not with_state:
        return set()
    latest = store.latest_statuses(suite)
    return {cell_id for cell_id in with_state if latest.get(cell_id) == status.KILLED}


def run_suite(suite: Suite, cells: list[Cell], options: RunOptions, report: Callable[[dict], None] = lambda e: None) -> RunSummary:
    """Run the cells that have no row yet; each finished cell is on disk before the next starts."""
    store = ResultStore(options.results)
    summary = RunSummary(run_id=new_run_id())
    tracker = tracking.Guard(options.tracker, suite.name, report)  # its failures: one warning, never a lost row

    def record(cell: Cell, outcome: Outcome, race_rung: int | None = None) -> None:
        identity = Identity(run_id=summary.run_id, suite=suite.name, suite_hash=suite.hash, cell_id=cell.id,
                            group_id=cell.group_id, status=outcome.status, error=outcome.error,
                            cell_json=cell.canonical(), race_rung=race_rung)
        row = CellResult(identity, cell, outcome.parts).row()
        if outcome.log is not None:
            store.log_path(suite.name, cell.id, summary.run_id).write_text(outcome.log)
        store.write(row, outcome.epochs)
        if outcome.status in (status.OK, status.DROPPED):  # a failed cell keeps its state: a retry resumes it
            store.clear_state(suite.name, cell.id)
        if outcome.files and cell.save_model != "none":
            store.keep_model(suite.name, cell.id, summary.run_id, outcome.files, cell.save_model, row.get("val_top1_tested"))
        summary.rows.append(row)
        report({"kind": "cell_done", "row": row})
        tracker.log_cell(row, outcome.epochs, outcome.log)

    # The executor connects before the folder is locked (a bad address changes nothing), and stops its cells
    # (closing `outcomes`) before it is unlocked, so no cell runs on behind a later run's back.
    with executors.create(options.devices, ray=options.ray, slurm=options.slurm) as executor, store.lock():
        todo, summary.skipped = select(cells, store, suite.name, options)
        report({"kind": "suite", "total": len(todo), "skipped": summary.skipped})
        options = dataclasses.replace(options, stored_resolutions=stored_resolutions(cells))
        missing = _missing_datasets(todo, options)
        for cell in todo:
            if _source(cell) in missing:  # one clear row per cell, no process started for nothing
                record(cell, cellproc.without_process(options.devices[0], *missing[_source(cell)]))
        runnable = [cell for cell in todo if _source(cell) not in missing]

        def run(batch: list[Cell], pause_at: int | None, rung: int | None) -> set[str]:
            """Run `batch` at once (a race's rung: pausing at `pause_at` epochs); record all but the pauses."""
            jobs = [job_for(c, options, store.state_dir(suite.name, c.id), pause_at=pause_at,
                            checkpoint_forced=rung is not None) for c in batch]
            recorded: set[str] = set()
            with contextlib.closing(executor.run(jobs, report)) as outcomes:
                for cell, outcome in outcomes:
                    if outcome.status == status.PAUSED:
                        report({"kind": "cell_paused", "cell_id": cell.id})
                    else:
                        record(cell, outcome, race_rung=rung)
                        recorded.add(cell.id)
            return recorded

        spec = None if options.retry_failed else options.race or suite.race  # a retry runs its cells to the end
        if spec is None:
            run(runnable, None, None)
        else:
            _race(spec, suite, only_cells(cells, options.only), runnable, store, options, run, record, report)
        if summary.rows:  # the run completed: one file for it, so a report over many runs stays quick
            store.compact_run(suite.name, summary.run_id)
    return summary


def _race(spec: RaceSpec, suite: Suite, chosen: list[Cell], runnable: list[Cell], store: ResultStore,
          options: RunOptions, run, record, report) -> None:
    """Run the cells that cannot race as usual, then race the rest (bench/race.py): every rung's cells at once."""
    from bench import race

    if options.max_cells is not None:
        raise SuiteError("--max-cells cannot cut a race short (its rungs need every config); drop one of them")
    if options.rerun:  # --rerun races again: the earlier race's cuts and paused states go
        store.race_log(suite.name).unlink(missing_ok=True)
        for cell in chosen:
            store.clear_state(suite.name, cell.id)
    run([c for c in runnable if not race.races(c)], None, None)
    raced = [c for c in chosen if race.races(c)]
    if not raced:
        return
    waiting = {c.id for c in runnable}
    done = {c.id for c in raced if c.id not in waiting}

    def drop(cell: Cell, rung: int, why: str) -> None:
        record(cell, _dropped(cell, store.saved_state(suite.name, cell.id), why, options.devices[0]), race_rung=rung)

    race.RaceRun(spec, raced, store, suite.name, done, run, drop, report).go()


def _dropped(cell: Cell, meta: dict | None, why: str, device: str) -> Outcome:
    """A dropped cell's row: its numbers at the rung, from its saved state."""
    from bench.result import Accuracy, Training

    outcome = cellproc.without_process(device, status.DROPPED, why)
    loop, used = (meta or {}).get("loop", {}), (meta or {}).get("resolved", {})
    epochs = loop.get("epochs", [])
    outcome.epochs = epochs
    outcome.parts["training"] = Training(
        epochs_run=loop.get("epochs_done"), steps_run=loop.get("step"), train_s=loop.get("train_s"),
        eval_s=loop.get("eval_s"), segments=(meta or {}).get("segments"), precision=used.get("precision"),
        lr=used.get("lr"), cuda_graphs=used.get("cuda_graphs"))
    if used.get("cudnn_benchmark") is not None:  # as the worker resolved it, as a finished row says
        outcome.parts["provenance"] = dataclasses.replace(outcome.parts["provenance"],
                                                          cudnn_benchmark=used["cudnn_benchmark"])
    last = epochs[-1].get("val_top1") if epochs else None
    outcome.parts["accuracy"] = Accuracy(val_top1_best=loop.get("best"), val_top1_final=last, val_top1_tested=last)
    if meta and meta.get("wall_s") is not None:
        outcome.parts["process"] = dataclasses.replace(outcome.parts["process"], wall_s=float(meta["wall_s"]))
    return outcome


def job_for(cell: Cell, options: RunOptions, state_dir: Path | None = None, **race) -> Job:
    """What the cell's process needs besides the cell, from the run's options (a cell's own time limit first); its
    saved-state folder, and in a race where to pause."""
    return Job(cell=cell, data_root=str(options.data_root) if options.data_root else None, download=options.download,
               stored_resolution=options.stored_resolutions.get(cell.dataset),
               timeout_s=cell.cell_timeout_s or options.cell_timeout_s, max_host_bytes=options.max_host_bytes,
               state_dir=str(Path(state_dir).resolve()) if state_dir else None, **race)


def stored_resolutions(cells: list[Cell]) -> dict[str, int]:
    """The side each dataset's image-folder images are decoded to, from the whole suite (not just the cells
    this run selects, so a resumed or narrowed run stores the same pixels): the explicit `source_resolution`
    where cells give one, else the largest resolution any cell asks for. `bench.data` caps it by the images'
    own size."""
    out: dict[str, int] = {}
    for dataset in dict.fromkeys(c.dataset for c in cells):
        mine = [c for c in cells if c.dataset == dataset]
        explicit = [c.source_resolution for c in mine if c.source_resolution]
        out[dataset] = max(explicit) if explicit else max(c.resolution for c in mine)
    return out


def _missing_datasets(cells: list[Cell], options: RunOptions) -> dict[tuple, tuple[str, str]]:
    """Fetch or decode each dataset once, up front; map the sources (`_source`) that cannot be had to
    (status, error)."""
    from bench import data
    from bench.errors import UnavailableError

    missing: dict[tuple, tuple[str, str]] = {}
    for source in dict.fromkeys(_source(c) for c in cells):
        dataset, image_column, label_column = source
        try:
            data.prepare(dataset, options.data_root, download=options.download,
                         stored_resolution=options.stored_resolutions.get(dataset), image_column=image_column,
                         label_column=label_column)
        except UnavailableError as exc:
            missing[source] = (status.UNAVAILABLE, f"{exc.__class__.__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - a corrupt file: every cell of it gets a row naming it
            missing[source] = (status.classify(exc), f"{exc.__class__.__name__} preparing {dataset}: {exc}"[:2000])
    return missing


def _source(cell: Cell) -> tuple[str, str | None, str | None]:
    """What a cell's data is read from: the dataset, and for an hf: dataset the columns the suite names."""
    return cell.dataset, cell.image_column, cell.label_column

