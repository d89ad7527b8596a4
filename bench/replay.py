"""A race replayed on a finished grid: which config the race would have picked, and for how many device-hours.

A full run already holds every number a race looks at: each cell's validation top-1 after every epoch, and what
each epoch cost. Replaying the race's own rule (`bench.race`: `rungs_for`, `rung_scores`, `cut`) over those epoch
rows says, without training anything, whether the race would have found the grid's pick and what it would have
spent: the way to judge a rule (eta, rungs, margin) on real grids, the nightly's history included.

Pure: the DataFrames `ResultStore.read()` hands over in, a `Replay` out; the CLI reads and prints.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import pandas as pd
from pydantic import ValidationError

from bench import race, status
from bench.errors import ResultsError, close_matches
from bench.suite import Cell, RaceSpec

# What a replay reads of each row (identity columns come with every read).
COLUMNS = ("group_id", "cell_json", "finished_at", "val_top1_tested", "val_top1_best", "epochs_run", "train_s",
           "eval_s", "val_images", "test_images")


@dataclass(frozen=True)
class Rung:
    """One simulated cut: after `epochs` epochs, `configs_in` racers scored and `kept` of them went on."""

    epochs: int
    configs_in: int
    kept: int
    line: float  # the cut-line: the k-th best validation top-1 (fraction)


@dataclass(frozen=True)
class Replay:
    """The race a grid would have run: its cuts, its pick against the grid's, and both sides' device-hours."""

    suite: str
    run_id: str
    configs: int
    rungs: list[Rung]
    pick: str  # group id of the race's best surviving config (best final validation mean over seeds)
    grid_pick: str  # group id of the grid's best config, chosen the same way over every config
    verdict: str  # same, within noise, or worse
    gap: float  # the grid pick's validation mean less the race pick's (fraction, >= 0)
    race_hours: float
    grid_hours: float

    def summary(self) -> str:
        """The last line `bench race replay` prints, in a fixed form that scripts may parse."""
        said = f"worse by {100 * self.gap:.2f} pts" if self.verdict == "worse" else self.verdict
        share = 100 * self.race_hours / self.grid_hours if self.grid_hours else math.nan
        return (f"race replay: pick {self.pick} (grid pick {self.grid_pick}; {said}), "
                f"device-hours {self.race_hours:.3f} of {self.grid_hours:.3f} ({share:.1f}%)")

    def table(self) -> str:
        """Each rung: the configs that came in and the configs kept, with the cut-line."""
        lines = [f"run {self.run_id} (suite {self.suite}): {self.configs} configs raced",
                 f"{'rung':>4} {'epochs':>6} {'configs in':>10} {'kept':>5} {'cut-line val %':>14}"]
        lines += [f"{k + 1:>4} {r.epochs:>6} {r.configs_in:>10} {r.kept:>5} {100 * r.line:>14.2f}"
                  for k, r in enumerate(self.rungs)]
        return "\n".join(lines if self.rungs else lines[:1] + ["no rung below the cells' epochs: the race is the grid"])


def choose_run(cells: pd.DataFrame, folder: str, run: str | None = None, suite: str | None = None) -> tuple[str, str]:
    """(suite, run id) to replay: `run` as given, else the newest run of `suite` (or of the folder) that is a full
    grid, i.e. has no rows a race dropped. Unknown names are errors that list what the folder holds."""
    if cells.empty:
        raise ResultsError(f"no results in {folder}; pass --results the folder a bench run wrote")
    scope = _only(cells, "suite", suite, "suite", folder) if suite else cells
    if run:
        scope = _only(scope, "run_id", run, "run", folder)
    else:
        raced = set(scope.loc[scope["status"] == status.DROPPED, "run_id"])
        scope = scope[~scope["run_id"].isin(raced)]
        if scope.empty:
            raise ResultsError(f"every run in {folder}{' of suite ' + suite if suite else ''} is a race; "
                               "replay a full grid's run (bench run without a race)")
        ends = scope.groupby("run_id")["finished_at"].max().sort_index().sort_values(na_position="first", kind="stable")
        scope = scope[scope["run_id"] == ends.index[-1]]
    suites = sorted(scope["suite"].unique())
    if len(suites) > 1:
        raise ResultsError(f"run {scope['run_id'].iloc[0]} holds suites {', '.join(suites)}; pass --suite one of them")
    return suites[0], str(scope["run_id"].iloc[0])


def _only(rows: pd.DataFrame, column: str, value: str, what: str, folder: str) -> pd.DataFrame:
    chosen = rows[rows[column] == value]
    if chosen.empty:
        known = sorted(rows[column].dropna().unique())
        raise ResultsError(f"no {what} {value!r} in {folder}{close_matches(value, known)}; pass one of: "
                           f"{', '.join(known[:10])}{' ...' if len(known) > 10 else ''}")
    return chosen


def replay(cells: pd.DataFrame, epochs: pd.DataFrame, spec: RaceSpec) -> Replay:
    """Race one run's rows (`cells`: one suite, one run, as `choose_run` chose) over its epoch rows under `spec`."""
    grid = _racers(cells)
    suite, run_id = str(cells["suite"].iloc[0]), str(cells["run_id"].iloc[0])
    mine = epochs if epochs.empty else epochs[(epochs["run_id"] == run_id) & epochs["cell_id"].isin(grid["cell_id"])]
    if mine.empty:
        raise ResultsError(f"run {run_id} has no epoch rows for its cells; a replay needs each epoch's validation "
                           "top-1 (rows from bench run keep them under epochs/): replay another run")
    table = mine.sort_values("epoch")
    by_cell = {cid: rows.to_dict("records") for cid, rows in table.groupby("cell_id")}
    racers = list(grid["_cell"])
    epochs_of = {cell.id: by_cell.get(cid, []) for cell, cid in zip(racers, grid["cell_id"])}
    alive, rungs, trained = {race.racer_key(c) for c in racers}, [], {}
    resumed = dict.fromkeys(alive, 0)  # racer -> how many times its cells paused at a rung and went on
    configs = len(alive)
    for rung in race.rungs_for(spec, max(c.epochs for c in racers)):
        scores = race.rung_scores([c for c in racers if race.racer_key(c) in alive], epochs_of, rung)
        decided = race.cut(scores, spec.eta, spec.margin)
        for racer in alive - set(decided.kept):
            trained[racer] = rung  # dropped here: its cells trained this many epochs and no more
        for racer in decided.kept:
            resumed[racer] += 1
        rungs.append(Rung(rung, len(scores), len(decided.kept), decided.line))
        alive &= set(decided.kept)
    hours = [_hours(row, by_cell.get(row["cell_id"], []), trained.get(key := race.racer_key(row["_cell"])),
                    resumed.get(key, 0))
             for _, row in grid.iterrows()]
    pick, grid_pick, said = _picks(grid, alive, spec)
    return Replay(suite, run_id, configs, rungs, pick.racer, grid_pick.racer, said, grid_pick.mean - pick.mean,
                  race_hours=sum(h[0] for h in hours), grid_hours=sum(h[1] for h in hours))


def _racers(cells: pd.DataFrame) -> pd.DataFrame:
    """The run's cells that race (trained with a validation split), each with its `Cell` rebuilt from the row."""
    run_id = cells["run_id"].iloc[0]
    if (cells["status"] == status.DROPPED).any():
        raise ResultsError(f"run {run_id} is itself a race (it has dropped rows); replay a full grid's run")
    try:
        built = [Cell.model_validate_json(text) for text in cells["cell_json"]]
    except (ValidationError, TypeError) as exc:
        raise ResultsError(f"run {run_id}: a row's cell_json does not fit this bench's cells ({str(exc)[:120]}); "
                           "replay it with the bench version that wrote it") from None
    grid = cells.assign(_cell=built)
    grid = grid[[race.races(c) for c in built]].reset_index(drop=True)
    racers = {race.racer_key(c) for c in grid["_cell"]}
    if len(racers) < 2:
        raise ResultsError(f"run {run_id} has {len(racers)} config(s) with a validation split; a race needs at least "
                           "2: replay a run of a larger grid")
    return grid


def _hours(row: pd.Series, epochs: list[dict], trained: int | None, resumed: int = 0) -> tuple[float, float]:
    """(race, grid) device-hours of one cell: each epoch trained at its own epoch_s and validated, plus the test
    pass. A dropped racer's cells count only the epochs before its cut and no test pass. Each time the
    race resumes a cell it pays the warm-up again (a new process: first steps, allocator, autotuning), estimated
    as what the grid's first epoch took over its later epochs' median."""
    done = int(row["epochs_run"]) if pd.notna(row["epochs_run"]) and row["epochs_run"] > 0 else len(epochs)
    if not done:
        return 0.0, 0.0
    # An epoch without its own time (an older row) counts as the cell's average epoch.
    average = float(row["train_s"]) / done if pd.notna(row["train_s"]) else 0.0
    times = [float(e["epoch_s"]) if pd.notna(e.get("epoch_s")) else average for e in epochs]
    val, test = _evaluation(row, done)
    upto = len(epochs) if trained is None else len([e for e in epochs if e["epoch"] < trained])
    warmup = max(0.0, times[0] - statistics.median(times[1:])) if len(times) >= 2 else 0.0
    race_s = sum(times[:upto]) + upto * val + (test if trained is None else 0.0) + resumed * warmup
    return race_s / 3600, (sum(times) + len(epochs) * val + test) / 3600


def _evaluation(row: pd.Series, done: int) -> tuple[float, float]:
    """(one validation pass, the test pass) in seconds: the cell's evaluation time split by images (a dropped
    cell never runs its test pass); an even share per epoch where the row does not say its image counts."""
    eval_s = float(row["eval_s"]) if pd.notna(row["eval_s"]) else 0.0
    val, test = (float(row[c]) if c in row and pd.notna(row[c]) else math.nan for c in ("val_images", "test_images"))
    if not (val > 0 and test >= 0):
        return eval_s / done, 0.0
    per_image = eval_s / (done * val + test)
    return per_image * val, per_image * test


def _picks(grid: pd.DataFrame, alive: set[str], spec: RaceSpec) -> tuple[race.Score, race.Score, str]:
    """The race's pick (the best config of a surviving racer), the grid's (the best of all) and their verdict."""
    racer_of = dict(zip(grid["group_id"], (race.racer_key(c) for c in grid["_cell"])))
    ranked = final_scores(grid)
    survivors = [s for s in ranked if racer_of[s.racer] in alive]
    if not survivors:
        raise ResultsError(f"run {grid['run_id'].iloc[0]}: no {'surviving ' if ranked else ''}config has a final "
                           "validation top-1 (val_top1_tested); replay a run whose cells finished ok")
    return survivors[0], ranked[0], verdict(ranked[0], survivors[0], spec.margin)


def final_scores(rows: pd.DataFrame) -> list[race.Score]:
    """Each config (group id, as `Score.racer`) scored as the report ranks it: the mean over seeds of the
    validation top-1 of the weights tested (val_top1_tested; older rows: val_top1_best); best first."""
    final = rows["val_top1_tested"].fillna(rows["val_top1_best"])
    found = (race.score(str(group), {str(group): list(vals.astype(float))})
             for group, vals in final.groupby(rows["group_id"]))
    return sorted((s for s in found if s is not None), key=lambda s: (-s.mean, s.racer))


def verdict(best: race.Score, pick: race.Score, margin: float) -> str:
    """same, within noise (the band a race's cut allows: `race.cut` over the two keeps both), or worse."""
    if pick.racer == best.racer:
        return "same"
    tied = race.cut([best, pick], eta=2, margin=margin)  # keeps the best, and the other if within its noise
    return "within noise" if pick.racer in tied.kept else "worse"
