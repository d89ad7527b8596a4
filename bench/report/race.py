"""A race as the report tells it: each config's validation top-1 at each rung, where it was dropped, and the
device-hours the race spent against the full grid's; from the rows and epoch tables alone (never race.json).

A racer is a leaderboard row's fold (its config without seed and tuned values), as `bench.race.racer_key` folds
it; its score at a rung is the race's own (`bench.race.score` over `bench.race.val_at`): its best tuned config's
mean over seeds of validation top-1 after that many epochs. A rung's epochs come from the rows: a dropped row ran
exactly its rung's epochs. A rung that dropped nobody leaves no row that says how many epochs it was, and the
report says so rather than guess.

Functions return raw values (fractions, seconds); the few sentences the report prints are made here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bench import race as rule
from bench import status
from bench.report import fmt, tables
from bench.report.context import ReportData

FINISHED, DROPPED, FAILED = "finished", "dropped", "failed"
RISK = ("The race's known risk: a config that learns slowly and overtakes late is dropped at an early rung; "
        "the command bench race replay replays a race on a full grid already run to show how often that happens.")


@dataclass(frozen=True)
class Race:
    """One suite's race as its rows tell it."""

    suite: str
    rungs: list[int | None]  # epochs at each rung (the first is rung 0); None where no row records them
    epochs: int | None  # the most epochs a raced cell was to train: what the finished ones ran
    # One row per config raced: label, model, cells, groups (its config ids), outcome (FINISHED, DROPPED or
    # FAILED), rung (where it was dropped, from 0), rank (on the leaderboard), scores (one per rung, None where
    # it was not scored), final (the leaderboard's validation mean), curve (the config id its curve shows),
    # spent_s and full_s. Finished ones first by rank, then failed ones, then dropped ones, latest rung first.
    racers: pd.DataFrame
    device: str  # "GPU" or "CPU": what the device-hours are hours of
    spent_s: float  # training and evaluation time of every raced cell, summed
    full_s: float  # the same for the full grid: estimated (see `full_s`)
    unestimated: int  # dropped cells without the times an estimate needs: counted at what they spent

    @property
    def saved_s(self) -> float:
        return self.full_s - self.spent_s

    def count(self, outcome: str) -> int:
        return int((self.racers["outcome"] == outcome).sum())


def races(data: ReportData) -> list[Race]:
    """Every suite's race among the shown rows (rows with a `race_rung`); empty when nothing raced."""
    raced = data.current[data.current["race_rung"].notna()]
    if raced.empty:
        return []
    epochs = _epoch_tables(data.epochs, raced)
    return [_race(data, suite, rows, epochs) for suite, rows in raced.groupby("suite", sort=True)]


def _race(data: ReportData, suite: str, rows: pd.DataFrame, epochs: dict[str, list[dict]]) -> Race:
    rungs = rung_epochs(rows)
    keys = [c for c in data.config if c not in tables.TUNED and c != "suite"]
    board = _board(data.leaderboard[data.leaderboard["suite"] == suite])
    backbone = [c for c in data.extra if c not in tables.TUNED]
    names = tables.weights_names(rows["weights"]) if "weights" in rows else None
    racers = [_racer(members, rungs, epochs, board, backbone, names)
              for _, members in rows.groupby(keys, sort=False, dropna=False)]
    table = pd.DataFrame(racers).astype({"rank": "Int64", "rung": "Int64"})
    number = {c: table[c].astype("Float64").to_numpy(float, na_value=np.nan) for c in ("last", "rung", "rank")}
    order = np.lexsort((-np.nan_to_num(number["last"], nan=-1), -np.nan_to_num(number["rung"], nan=-1),
                        np.nan_to_num(number["rank"], nan=np.inf),
                        table["outcome"].map({FINISHED: 0, FAILED: 1, DROPPED: 2}).to_numpy()))
    on_gpu = rows["device"].astype(str).str.startswith("cuda") | rows["gpu_name"].notna()
    return Race(suite=str(suite), rungs=rungs, epochs=_int(rows["epochs"].max()),
                racers=table.iloc[order].reset_index(drop=True), device="GPU" if on_gpu.any() else "CPU",
                spent_s=float(table["spent_s"].sum()), full_s=float(table["full_s"].sum()),
                unestimated=int(table["unestimated"].sum()))


def rung_epochs(rows: pd.DataFrame) -> list[int | None]:
    """Each rung's epochs, from the dropped rows (they ran exactly that many); the last rung's also from the
    finished rows that paused at every rung and nowhere else (their last segment began there). A finished row's
    `race_rung` is the number of rungs."""
    dropped = rows[rows["status"] == status.DROPPED]
    others = rows.loc[rows["status"] != status.DROPPED, "race_rung"]
    count = int(others.max()) if len(others) else 0
    if len(dropped):
        count = max(count, int(dropped["race_rung"].max()) + 1)
    out: list[int | None] = []
    for k in range(count):
        ran = dropped.loc[dropped["race_rung"] == k, "epochs_run"].dropna()
        out.append(int(ran.mode().iloc[0]) if len(ran) else None)
    # A killed and resumed cell ran in more segments: its last one began elsewhere.
    straight = rows[(rows["status"] == status.OK) & (rows["segments"] == count + 1) & (rows["race_rung"] == count)]
    began = straight["resumed_from_epoch"].dropna()
    if count and out[-1] is None and len(began):
        out[-1] = int(began.mode().iloc[0])
    return out


def _epoch_tables(epochs: pd.DataFrame, rows: pd.DataFrame) -> dict[str, list[dict]]:
    """cell id -> its epoch rows (of the run its shown row came from), in epoch order."""
    if epochs.empty:
        return {}
    mine = epochs.merge(rows[["suite", "run_id", "cell_id"]], on=["suite", "run_id", "cell_id"])
    return {str(c): t.sort_values("epoch").to_dict("records") for c, t in mine.groupby("cell_id")}


def _board(board: pd.DataFrame) -> dict[str, pd.Series]:
    """config id -> the leaderboard row that folds it (a tuned value not chosen maps to the row that was)."""
    return {g: row for _, row in board.iterrows() for g in row["candidates"]}


def _racer(members: pd.DataFrame, rungs: list[int | None], epochs: dict[str, list[dict]],
           board: dict[str, pd.Series], backbone: list[str], names: dict[str, str] | None = None) -> dict:
    """One config's race: its outcome, its score at every rung it was alive for, and its hours."""
    first = members.iloc[0]
    dropped = members[members["status"] == status.DROPPED]
    ok = members[members["status"] == status.OK]
    outcome = FINISHED if len(ok) else DROPPED if len(dropped) else FAILED
    reach = min(int(members["race_rung"].max()), len(rungs) - 1)
    scores, best_group = [], None
    for k, rung in enumerate(rungs):
        if rung is None or k > reach:
            scores.append(None)
            continue
        found, best_group = _score(members, epochs, rung)
        scores.append(found)
    row = next((board[g] for g in members["group_id"] if g in board), None) if len(ok) else None
    last = next((s for s in reversed(scores) if s is not None), None)
    spent = [spent_s(r) for _, r in members.iterrows()]
    full = [full_s(r, epochs.get(r["cell_id"], [])) for _, r in members.iterrows()]
    return dict(
        label=tables.config_label(first, backbone, names), model=str(first["model"]), cells=len(members),
        groups=sorted(members["group_id"].astype(str).unique()), outcome=outcome,
        rung=int(dropped["race_rung"].min()) if outcome == DROPPED else None,
        rank=row["rank"] if row is not None and pd.notna(row["rank"]) else None,
        scores=scores, last=last, final=row["val_mean"] if row is not None else math.nan,
        curve=str(row["group_id"]) if row is not None else best_group or str(first["group_id"]),
        spent_s=sum(spent), full_s=sum(s if f is None else f for s, f in zip(spent, full)),
        unestimated=sum(f is None for f in full))  # a dropped cell without times counts at what it spent


def _score(members: pd.DataFrame, epochs: dict[str, list[dict]], rung: int) -> tuple[float | None, str | None]:
    """The racer's score after `rung` epochs, as the race computed it, and which tuned config (group) gave it."""
    values: dict[str, list[float | None]] = {}
    for _, cell in members.iterrows():
        values.setdefault(str(cell["group_id"]), []).append(rule.val_at(epochs.get(cell["cell_id"], []), rung))
    found = rule.score("racer", values)
    if found is None:
        return None, None
    best = max(values, key=lambda g: s.mean if (s := rule.score(g, {g: values[g]})) is not None else -math.inf)
    return found.mean, best


def spent_s(row: pd.Series) -> float:
    """What a raced cell cost: its training and evaluation time (either missing counts nothing)."""
    return float(np.nansum([_num(row["train_s"]), _num(row["eval_s"])]))


def full_s(row: pd.Series, epochs: list[dict]) -> float | None:
    """What a cell would have cost in the full grid: a finished or failed cell what it spent; a dropped one its
    own time per epoch so far (the mean epoch_s of its epoch rows, else train_s per epoch, plus eval_s per epoch)
    times its full `epochs`. None when a dropped row lacks those times."""
    if row["status"] != status.DROPPED:
        return spent_s(row)
    done = _int(row["epochs_run"]) or len(epochs)
    timed = [float(e["epoch_s"]) for e in epochs if pd.notna(e.get("epoch_s"))]
    train = sum(timed) / len(timed) if timed else _num(row["train_s"]) / done if done else math.nan
    total = _int(row["epochs"])
    if not done or math.isnan(train) or not total:
        return None
    evaluate = _num(row["eval_s"]) / done
    return (train + (0.0 if math.isnan(evaluate) else evaluate)) * total


def _num(value: object) -> float:
    return math.nan if value is None or pd.isna(value) else float(value)


def _int(value: object) -> int | None:
    return None if value is None or pd.isna(value) else int(value)


def dropped(data: ReportData) -> pd.DataFrame:
    """The configs every race dropped, each with its suite, rung and score there, latest rung first."""
    found = [r.racers.assign(suite=r.suite, rung_epochs=[_at(r.rungs, k) for k in r.racers["rung"]])
             for r in races(data)]
    rows = pd.concat(found, ignore_index=True) if found else pd.DataFrame(columns=["outcome"])
    return rows[rows["outcome"] == DROPPED].reset_index(drop=True)


def _at(rungs: list[int | None], k: object) -> int | None:
    return rungs[int(k)] if pd.notna(k) and int(k) < len(rungs) else None


# --- words ---------------------------------------------------------------------------------------------------


def rung_name(k: int, epochs: object) -> str:
    """'rung 1 (3 epochs)': rungs counted from 1, as the race's messages count them."""
    if epochs is None or pd.isna(epochs):
        return f"rung {k + 1} (epochs not recorded)"
    return f"rung {k + 1} ({int(epochs)} epoch{'s' if int(epochs) != 1 else ''})"


def hours(seconds: float, device: str) -> str:
    return f"{fmt.hours(seconds / 3600)} {device}-h"


def summary(r: Race) -> str:
    """The race in one sentence: configs in, rungs, who finished and who was dropped where."""
    drops = r.racers.loc[r.racers["outcome"] == DROPPED, "rung"].value_counts()
    where = ", ".join(f"{int(drops.get(k, 0))} at {rung_name(k, e)}" for k, e in enumerate(r.rungs))
    failed = f"; {r.count(FAILED)} failed" if r.count(FAILED) else ""
    upto = f" all {r.epochs} epochs" if r.epochs else ""
    cut = f"{r.count(DROPPED)} were dropped: {where}" if r.count(DROPPED) else "none was dropped"
    return (f"Suite {r.suite} raced {len(r.racers)} configs ({int(r.racers['cells'].sum())} cells) on validation "
            f"top-1 at {len(r.rungs)} rung(s): {r.count(FINISHED)} finished{upto}; {cut}{failed}.")


def unrecorded(r: Race) -> str:
    """Why a rung's scores are missing: nothing in the rows says how many epochs it was."""
    missing = [str(k + 1) for k, e in enumerate(r.rungs) if e is None]
    if not missing:
        return ""
    which = f"Rung {missing[0]}" if len(missing) == 1 else f"Rungs {', '.join(missing)}"
    return (f"{which} dropped no config, and no row records how many epochs it was (a dropped row ran exactly its "
            "rung's epochs; a finished row records only the last rung, where it resumed from), so its scores are "
            "not shown.")


def cost(r: Race) -> str:
    """Device-hours spent against the full grid's estimate, and what that saved."""
    share = f" ({100 * r.saved_s / r.full_s:.0f}%)" if r.full_s > 0 else ""
    missing = (f" {r.unestimated} dropped cell(s) recorded no times to estimate from and count at what they spent."
               if r.unestimated else "")
    return (f"Device-hours: the race spent {hours(r.spent_s, r.device)} (training and validation of every raced "
            f"cell); the full grid would have taken about {hours(r.full_s, r.device)}, so the race saved about "
            f"{hours(r.saved_s, r.device)}{share}. The full grid's figure is an estimate: the finished cells' own "
            "time, plus each dropped cell's own time per epoch so far (its epochs' mean epoch_s and its validation "
            "time per epoch) times its full epochs; it leaves out the test pass a dropped cell never ran, and a "
            f"first epoch's warm-up counts in the mean.{missing}")


def pick_note(data: ReportData) -> str:
    """The 'Which should I pick?' line: the answer came from a race, and what the race saved. Empty without one."""
    found = races(data)
    if not found:
        return ""
    parts = []
    for r in found:
        share = f", {100 * r.saved_s / r.full_s:.0f}%" if r.full_s > 0 else ""
        parts.append(f"suite {r.suite}: {r.count(FINISHED)} of {len(r.racers)} configs finished, {r.count(DROPPED)} "
                     f"dropped at a rung; it spent {hours(r.spent_s, r.device)} of the full grid's estimated "
                     f"{hours(r.full_s, r.device)}, saving about {hours(r.saved_s, r.device)}{share}")
    if not any(r.count(DROPPED) for r in found):
        return ("This answer comes from a race (" + "; ".join(parts) + "): every config stayed within noise of the "
                "cut-line or above it, so the pick is the one the full grid would have given.")
    return ("This answer comes from a race (" + "; ".join(parts) + "): the pick is the best of the configs that "
            "finished, chosen on validation as always; the dropped ones are listed under the leaderboard and in "
            "the Race section. " + RISK)


# --- tables --------------------------------------------------------------------------------------------------


def rung_table(r: Race) -> fmt.Table:
    """Each config of one race: its score at every rung, its final validation, its outcome and its hours."""
    rungs = [(f"val % at {rung_name(k, e)}", (lambda row, k=k: fmt.pct(row["scores"][k])), True)
             for k, e in enumerate(r.rungs)]
    columns = [("config", lambda row: fmt.text(row["label"]), False),
               ("cells", lambda row: fmt.text(row["cells"]), True), *rungs,
               (f"val % final ({r.epochs} epochs, selects)", lambda row: fmt.pct(row["final"]), True),
               ("outcome", _outcome, False),
               ("device-hours spent", lambda row: hours(row["spent_s"], r.device), True),
               ("full grid (est.)", lambda row: hours(row["full_s"], r.device), True),
               ("config ids", lambda row: ", ".join(row["groups"]), False)]
    note = ("Each rung: the config's score as the race saw it, the mean over seeds of validation top-1 after that "
            "many epochs at its best tuned values (– where it no longer raced). Final: validation top-1 as the "
            "leaderboard ranks it (the weights tested). At each rung the best 1/eta went on, and so did every config "
            "within noise of the cut-line (2 standard errors of the difference with two seeds or more, the seeds' "
            "variance pooled over the rung's configs; the suite's "
            "margin with one). Device-hours: training and validation time of all the config's cells (seeds and "
            "tuned values summed), where the leaderboard shows train time per seed. Finished configs first, by rank; "
            "then dropped ones, latest rung first, best first.")
    return fmt.table("Validation top-1 at each rung", r.racers, columns, note, css=_row_class)


def _row_class(row: pd.Series) -> str:
    if row["outcome"] != FINISHED:
        return "unranked"
    return "near" if row["rank"] == 1 else ""


def _outcome(row: pd.Series) -> str:
    if row["outcome"] == FINISHED:
        return f"finished, #{row['rank']}" if pd.notna(row["rank"]) else "finished"
    if row["outcome"] == DROPPED:
        return f"dropped at rung {int(row['rung']) + 1}"
    return "failed (see Failed cells)"


def dropped_table(data: ReportData) -> fmt.Table | None:
    """The configs the races dropped, for under the leaderboard (never ranked beside the finished ones); None
    when no race dropped any."""
    rows = dropped(data)
    if rows.empty:
        return None
    suite = [("suite", lambda r: fmt.text(r["suite"]), False)] if data.current["suite"].nunique() > 1 else []
    columns = suite + [
        ("config", lambda r: fmt.text(r["label"]), False),
        ("dropped at", lambda r: rung_name(int(r["rung"]), r["rung_epochs"]), False),
        ("val top-1 % at the rung", lambda r: fmt.pct(r["last"]), True),
        ("cells", lambda r: fmt.text(r["cells"]), True), ("config ids", lambda r: ", ".join(r["groups"]), False),
    ]
    note = (f"{len(rows)} config(s) the race stopped at a rung, on their validation top-1 after that many epochs "
            "(mean over seeds, best tuned values): a figure from fewer epochs than the ranked configs', so they are "
            "not ranked beside them. Latest rung first, best first; the Race section has every rung.")
    return fmt.table("Dropped by the race (not ranked)", rows, columns, note, css=lambda r: "unranked")
