"""The nightly's judgement: each config tonight against its own history of earlier runs of the suite.

The rule. Per config, the history is the mean over seeds of every earlier run that has the config (the newest
WINDOW of them), with a night more than OUTLIER_K robust sds (1.4826 x MAD) from the history's median left out
once there are OUTLIER_MIN nights to judge that by. Tonight's mean is tested against the history's mean and
night-to-night sd with Student's prediction t, t = (mean - tonight) / (sd * sqrt(1 + 1/n)) on n - 1 degrees of
freedom, one-sided (only a drop is a regression). Top-1 is tested in points; images/s as log(images/s) (speed
noise is relative), against only the nights on tonight's GPU and library versions (PROVENANCE). Every p-value of
the report is Holm-corrected together, and a config regresses when its corrected p is below ALPHA and its drop
also exceeds a practical floor (TOP1_FLOOR, SPEED_FLOOR). Each metric stands on its own (a throughput-mode config
has images/s only). A suite with fewer than MIN_HISTORY earlier runs, and a metric of a config with fewer nights
(a speed: on tonight's machine), is judged against the previous run alone (`bench.report.compare`), as
`--compare RUN` always is; the `rule` column says which rule judged each metric of a row.

Why this rule. Apache Otava (the change-point detector MongoDB and DataStax run on their CI history; Matteson
and James's E-divisive with the Hunter paper's t-test, windows and weak change points) answers a neighbouring
question: where, in a long series, did the level change? Its strengths are taken here in their cheap form: the
statistics come from the recent past (a window of WINDOW runs, Otava's own default window length; an accepted
change resets it through a pinned baseline, see the README), a significance test that adapts to each series' own
noise, and a minimum magnitude. Its search itself is not: a nightly must decide about the newest point, where a
split has one point on its right and Otava's significance test reduces to this same t-test of one value against
the segment before it; and Otava sets a p-value threshold per series (0.001 by default), so 200 configs would
fail about one night in five on noise alone. Here the night is the family: Holm keeps the chance that any config
of a night is flagged on noise below ALPHA (Benjamini-Hochberg would bound the share of false flags instead, but
one false flag already fails the night; with a single real drop both need the same p). The t-test, not a z with
a floored sd, because with five to ten nights the plug-in sd is itself noisy and a z would cry wolf (t is exact
for normal noise); the practical floor stops a flat history (a deterministic config) from flagging 0.01 pts. Pooling
the variance over configs (limma's moderated t) would add power in the first ten nights, but it assumes configs
share a noise level, which linear probes (near deterministic) and full fine-tunes do not.

Measured (tests/test_nightly_history.py: 200 configs, one seed, 30 nights, each config's night-to-night sd drawn
uniformly from 0.2 to 0.5 points, values rounded to one image in 10,000, 20 simulated histories): 25 false alarms
in 100,000 config-nights (the goal: at most 100), as Holm promises (0.05 / 200). A 2-point drop on night 30 is
caught that night in all 135 trials where the config's sd is below 0.3 points, 92% at 0.3-0.4 and 75% at 0.4-0.5,
where 2 points is only 4-5 sds and Holm's first step over 200 configs asks for about 4. With five to ten nights
of history the t-test needs a much larger drop: its sd is itself uncertain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from bench.report.compare import PREVIOUS, PROVENANCE, compare_runs, finish, joined
from bench.report.select import normalise
from bench.report.stats import NOISE_K, holm, t_isf, t_sf
from bench.report.tables import GROUP, config_label

MIN_HISTORY = 5  # earlier runs a config needs before its history judges it; fewer: the previous run alone
WINDOW = 30  # the newest earlier runs a config's history holds (Otava's default window length)
ALPHA = 0.05  # family-wise error per report: Holm over every test the report makes
OUTLIER_K = 6.0  # a history night this many robust sds from the median is left out...
OUTLIER_MIN = 8  # ...once the history has this many nights (with fewer, the MAD is too noisy to judge by)
TOP1_FLOOR = 0.005  # a top1 drop must also exceed 0.5 pts: on a flat history significance alone flags 0.01 pts
SPEED_FLOOR = 0.05  # and an images/s drop 5%
# The smallest night-to-night sd believed: one test image in 10,000 for top1, 0.1% for log images/s.
SD_FLOOR = {"top1": 1e-4, "ips": 1e-3}
HISTORY = "history"  # the `rule` of a config judged against its history


@dataclass(frozen=True)
class Judgement:
    comparison: pd.DataFrame  # one row per config compared (`compare.compare_runs`'s columns)
    rules: list[str]  # per suite: how many configs were compared, and by which rule
    notes: list[str]  # what the comparison could not judge (speed across GPUs or library versions)


def history_rows(cells: pd.DataFrame, current: pd.DataFrame) -> pd.DataFrame:
    """`earlier_runs` from the store's raw rows: only the current cells' rows are normalised (a year of nights
    of other cells costs nothing)."""
    return earlier_runs(normalise(cells[cells["cell_id"].isin(current["cell_id"])]), current)


def earlier_runs(cells: pd.DataFrame, current: pd.DataFrame) -> pd.DataFrame:
    """The rows of every run of the current suites that provided none of the current rows, shares cells with
    them and ended before the newest of them (as `select.previous_run` defines "previous"), one row per cell
    and run. `cells` and `current` are normalised rows (`select.normalise`)."""
    keys = current[["suite", "cell_id"]].drop_duplicates()
    rows = cells[~cells["run_id"].isin(current["run_id"])].merge(keys, on=["suite", "cell_id"])
    newest = current.groupby("suite")["_when"].max().rename("_newest")
    rows = rows.join(newest, on="suite")
    rows = rows[rows["_when"].isna() | rows["_newest"].isna() | (rows["_when"] < rows["_newest"])]
    rows = rows.sort_values(["_when", "run_id"], na_position="first", kind="stable")
    return rows.drop_duplicates(["suite", "run_id", "cell_id"], keep="last").drop(columns="_newest")


def judge(current: pd.DataFrame, baseline: pd.DataFrame, history: pd.DataFrame | None, extra: list[str], *,
          top1_drop: float, speed_drop: float) -> Judgement:
    """Tonight's configs against their history where a suite has MIN_HISTORY earlier runs, else against the
    previous run (`baseline`); `history` None (`--compare RUN`) means one run, whatever the history."""
    previous = compare_runs(current, baseline, extra, top1_drop=top1_drop, speed_drop=speed_drop)
    runs = history.groupby("suite")["run_id"].nunique() if history is not None and not history.empty else {}
    deep = [s for s in current["suite"].unique() if runs.get(s, 0) >= MIN_HISTORY]
    judged = _against_history(current[current["suite"].isin(deep)], history, previous, extra) if deep else None
    if judged is not None and not judged.empty:
        keep = previous.set_index(GROUP).index.difference(judged.set_index(GROUP).index)
        previous = previous.set_index(GROUP).loc[keep].reset_index()
        comparison = finish(pd.concat([judged, previous], ignore_index=True))
    else:
        comparison = previous
    rules = [_rule_line(s, comparison, runs.get(s, 0), history is None, top1_drop, speed_drop)
             for s in current["suite"].unique()]
    return Judgement(comparison, rules, _speed_notes(comparison))


def _against_history(current: pd.DataFrame, history: pd.DataFrame, previous: pd.DataFrame,
                     extra: list[str]) -> pd.DataFrame:
    """The configs of `current` with MIN_HISTORY nights of a metric, tested against them (Holm over all tests)."""
    tonight = _nights(current)
    nights = _nights(history)
    nights = nights.merge(tonight[GROUP], on=GROUP)
    nights = nights.sort_values("_when", na_position="first", kind="stable").groupby(GROUP).tail(WINDOW)
    top1 = _test(nights, tonight, "top1", same_machine=False)
    ips = _test(nights, tonight, "ips", same_machine=True)  # throughput-mode configs have this one only
    if top1.empty and ips.empty:
        return pd.DataFrame()
    p = np.concatenate([top1["p"].to_numpy(dtype=float), ips["p"].to_numpy(dtype=float)])
    adjusted = holm(p)
    # The drop that alone would be flagged: Holm's first, strictest step (alpha / tests).
    allowed = t_isf(np.full(len(p), ALPHA / len(p)), np.concatenate([top1["n"], ips["n"]]).astype(float) - 1)
    top1 = top1.assign(p_holm=adjusted[:len(top1)], crit=allowed[:len(top1)])
    ips = ips.assign(p_holm=adjusted[len(top1):], crit=allowed[len(top1):])
    return _rows(current, extra, top1, ips, previous)


def _nights(rows: pd.DataFrame) -> pd.DataFrame:
    """Per config and run: mean top1 and log images/s over the ok seeds, when it ended, and its provenance."""
    ok = rows[rows["status"] == "ok"]
    ok = ok.assign(ips=np.log(ok["images_per_s"].where(ok["images_per_s"] > 0)),
                   machine=[" | ".join("?" if pd.isna(v) else str(v) for v in r)
                            for r in ok[[c for c in PROVENANCE if c in ok]].itertuples(index=False)])
    by = ok.groupby([*GROUP, "run_id"], sort=False)
    return by.agg(top1=("top1", "mean"), ips=("ips", "mean"), _when=("_when", "max"),
                  machine=("machine", "first"), seeds=("cell_id", "size")).reset_index()


def _test(nights: pd.DataFrame, tonight: pd.DataFrame, metric: str, *, same_machine: bool) -> pd.DataFrame:
    """Per config with MIN_HISTORY nights of `metric`: the history's n, mean and sd (`against_history`),
    tonight's value, the one-sided p-value of its drop, and the first and last runs of the history."""
    values = nights.dropna(subset=[metric]).merge(tonight[[*GROUP, "machine"]], on=GROUP, suffixes=("", "_now"))
    if same_machine:
        values = values[values["machine"] == values["machine_now"]]
    values = values[values.groupby(GROUP)[metric].transform("count") >= MIN_HISTORY]
    if values.empty:
        return pd.DataFrame(columns=["n", "mean", "sd", "scale", "p", "tonight", "first", "last"],
                            index=pd.MultiIndex.from_tuples([], names=GROUP))
    by = values.groupby(GROUP)  # sorted by config: the matrix's rows, in this order
    keys = by.size().index
    column = by.cumcount().to_numpy()
    matrix = np.full((len(keys), column.max() + 1), np.nan)
    matrix[keys.get_indexer(pd.MultiIndex.from_frame(values[GROUP])), column] = values[metric].to_numpy()
    now = tonight.set_index(GROUP)[metric].reindex(keys).to_numpy()
    stats = pd.DataFrame(vars(against_history(matrix, now, SD_FLOOR[metric])), index=keys)
    return stats.assign(tonight=now, first=by["run_id"].first(), last=by["run_id"].last()).dropna(subset=["tonight"])


@dataclass(frozen=True)
class Tested:
    n: np.ndarray  # nights used (outliers left out)
    mean: np.ndarray
    sd: np.ndarray  # night-to-night, at least the floor
    scale: np.ndarray  # sd of tonight minus the mean: sd * sqrt(1 + 1/n)
    p: np.ndarray  # one-sided: the chance of a drop this large from noise alone


def against_history(history: np.ndarray, tonight: np.ndarray, sd_floor: float) -> Tested:
    """Tonight's values against histories (the last axis: nights, NaN where a config did not run; at least two
    each): outlier nights left out, then Student's prediction t of a drop on n - 1 degrees of freedom."""
    h = np.asarray(history, dtype=float)
    count = np.sum(~np.isnan(h), axis=-1, keepdims=True)
    distance = np.abs(h - _median(h, count))
    robust = np.maximum(1.4826 * _median(distance, count), sd_floor)
    h = np.where((count >= OUTLIER_MIN) & (distance > OUTLIER_K * robust), np.nan, h)
    n = np.sum(~np.isnan(h), axis=-1)
    mean, sd = np.nanmean(h, axis=-1), np.maximum(np.nanstd(h, axis=-1, ddof=1), sd_floor)
    scale = sd * np.sqrt(1 + 1 / n)
    return Tested(n=n, mean=mean, sd=sd, scale=scale, p=t_sf((mean - np.asarray(tonight, dtype=float)) / scale, n - 1))


def _median(values: np.ndarray, count: np.ndarray) -> np.ndarray:
    """The median over the last axis of the `count` values that are not NaN (np.nanmedian, without its slow loop):
    sorting puts the NaNs last."""
    ordered = np.sort(values, axis=-1)
    low = np.take_along_axis(ordered, np.maximum(count - 1, 0) // 2, axis=-1)
    high = np.take_along_axis(ordered, count // 2, axis=-1)
    return (low + high) / 2


def _rows(current: pd.DataFrame, extra: list[str], top1: pd.DataFrame, ips: pd.DataFrame,
          previous: pd.DataFrame) -> pd.DataFrame:
    """The comparison's rows of the configs a history judged: its figures for each metric it judged, the previous
    run's for one it could not (too few nights, or none on tonight's machine), the lost seeds always."""
    mine = current[current.set_index(GROUP).index.isin(top1.index.union(ips.index))]
    by = mine.groupby(GROUP, sort=False)
    out = by.head(1).set_index(GROUP)[["model"]].assign(
        label=[config_label(r, extra) for _, r in by.head(1).iterrows()], seeds=by.size(),
        run_after=by["run_id"].agg(joined), cell_ids=by["cell_id"].agg(joined),
        status="– → " + by["status"].agg(lambda s: ", ".join(sorted(set(s.astype(str))))), provenance="", lost="",
        top1_after_std=mine[mine["status"] == "ok"].groupby(GROUP)["top1"].std(), threshold_only=False,
        top1_p=np.nan, top1_p_holm=np.nan, ips_p=np.nan, ips_p_holm=np.nan)
    top1_columns = ["top1_before", "top1_before_std", "top1_after", "top1_delta", "top1_allowed"]
    ips_columns = ["ips_before", "ips_after", "ips_rel", "ips_allowed"]  # the history's: geometric means
    kept = ["status", "provenance", "lost", "run_before", *top1_columns, *ips_columns]
    out = previous.set_index(GROUP)[kept].reindex(out.index).combine_first(out)
    for tested, columns, figures in (
            (top1, [*top1_columns, "top1_p", "top1_p_holm"],
             lambda t: [t["mean"], t["sd"], t["tonight"], t["tonight"] - t["mean"],
                        (t["crit"] * t["scale"]).clip(lower=TOP1_FLOOR)]),
            (ips, [*ips_columns, "ips_p", "ips_p_holm"],
             lambda t: [np.exp(t["mean"]), np.exp(t["tonight"]), np.exp(t["tonight"] - t["mean"]) - 1,
                        (1 - np.exp(-t["crit"] * t["scale"])).clip(lower=SPEED_FLOOR)])):
        if not tested.empty:
            out.loc[tested.index, columns] = np.column_stack([*figures(tested), tested["p"], tested["p_holm"]])
    span = pd.concat([t for t in (ips, top1) if not t.empty])[["n", "first", "last"]].groupby(level=GROUP).last()
    out["nights"] = span["n"].reindex(out.index)
    out.loc[span.index, "run_before"] = [f"{n} runs ({a} … {b})" for n, a, b in span.itertuples(index=False)]
    records = out.reset_index().to_dict("records")
    out["rule"] = [_rule(r) for r in records]
    out["regression"] = [_reasons(r, len(top1) + len(ips)) for r in records]
    return out.reset_index()


def _rule(r: dict) -> str:
    """"history" when the history judged every metric measured, else which rule judged each."""
    metrics = (("top1", "top1_p", "top1_delta"), ("images/s", "ips_p", "ips_rel"))
    rules = {name: HISTORY if pd.notna(r[p]) else PREVIOUS for name, p, delta in metrics if pd.notna(r[delta])}
    return HISTORY if set(rules.values()) <= {HISTORY} else "; ".join(f"{m}: {v}" for m, v in rules.items())


def _reasons(r: dict, tests: int) -> str:
    """Why a history-judged config regressed ("" when it did not): lost seeds, then top1, then images/s."""
    reasons = [r["lost"]] if r["lost"] else []
    if pd.notna(r["top1_p_holm"]) and r["top1_p_holm"] < ALPHA and -r["top1_delta"] > TOP1_FLOOR:
        reasons.append(f"top1 {100 * r['top1_delta']:+.2f} pts against its history of {r['nights']} runs "
                       f"(mean {100 * r['top1_before']:.2f}% ± {100 * r['top1_before_std']:.2f}; one-sided t "
                       f"p = {r['top1_p']:.1g}, Holm over {tests} tests {r['top1_p_holm']:.1g}; "
                       f"allowed drop {100 * r['top1_allowed']:.2f} pts)")
    elif pd.isna(r["top1_p"]) and pd.notna(r["top1_delta"]) and -r["top1_delta"] > r["top1_allowed"] + 1e-9:
        reasons.append(f"top1 {100 * r['top1_delta']:+.2f} pts against the previous run (allowed drop "
                       f"{100 * r['top1_allowed']:.2f} pts: fewer than {MIN_HISTORY} nights for a history)")
    if pd.notna(r["ips_p_holm"]) and r["ips_p_holm"] < ALPHA and -r["ips_rel"] > SPEED_FLOOR:
        reasons.append(f"images/s {100 * r['ips_rel']:+.1f}% against its history on this GPU and library versions "
                       f"(p = {r['ips_p']:.1g}, Holm {r['ips_p_holm']:.1g}; "
                       f"allowed drop {100 * r['ips_allowed']:.1f}%)")
    elif pd.isna(r["ips_p"]) and pd.notna(r["ips_rel"]) and -r["ips_rel"] > r["ips_allowed"] + 1e-9:
        reasons.append(f"images/s {100 * r['ips_rel']:+.1f}% against the previous run (allowed drop "
                       f"{100 * r['ips_allowed']:.1f}%: too few nights on this GPU and library versions for a history)")
    return "; ".join(reasons)


def _rule_line(suite: str, comparison: pd.DataFrame, earlier: int, one_run: bool, top1_drop: float,
               speed_drop: float) -> str:
    """How many configs of `suite` were compared, and by which rule: the job summary's and the report's line."""
    rows = comparison[comparison["suite"] == suite]
    if rows.empty:
        return f"{suite}: nothing compared (no earlier run shares cells with these rows)"
    by_history = rows["rule"].astype(str).str.contains(HISTORY)  # at least one metric judged by its history
    parts = []
    if by_history.any():
        nights = rows.loc[by_history, "nights"].astype(int)
        span = f"{nights.min()}" if nights.min() == nights.max() else f"{nights.min()}-{nights.max()}"
        tests = int(comparison["top1_p"].notna().sum() + comparison["ips_p"].notna().sum())
        parts.append(f"{int(by_history.sum())} against their own history ({span} earlier runs, the newest {WINDOW} "
                     "at most): a one-sided t-test of tonight against each config's night-to-night mean and sd (top1; "
                     "images/s against the runs on the same GPU and library versions), Holm over the report's "
                     f"{_count(tests, 'test')} at α {ALPHA}, and a drop beyond {100 * TOP1_FLOOR:.1f} pts top1 or "
                     f"{100 * SPEED_FLOOR:.0f}% images/s")
    previous = rows[~by_history]
    if len(previous):
        why = ("one run, as asked" if one_run else f"{_count(earlier, 'earlier run')}; a history needs {MIN_HISTORY}"
               if earlier < MIN_HISTORY else f"fewer than {MIN_HISTORY} earlier runs of their own")
        text = (f"{len(previous)} against run {joined(previous['run_before'])} ({why}): a drop beyond "
                f"{100 * top1_drop:.2f} pts top1 or {100 * speed_drop:.0f}% images/s and {NOISE_K:g} standard errors "
                "of the seeds' spread")
        single = int(previous["threshold_only"].sum())
        if single:
            has, them = ("has", "it") if single == 1 else ("have", "them")
            text += (f"; {single} of them ran one seed on each side and {has} no history, so the threshold alone "
                     f"judged {them}")
        parts.append(text)
    return f"{suite}: {_count(len(rows), 'config')} compared: " + "; ".join(parts)


def _speed_notes(comparison: pd.DataFrame) -> list[str]:
    """One line per suite and provenance change: the configs compared for accuracy only, not images/s."""
    moved = comparison[(comparison["provenance"].fillna("") != "") & comparison["ips_p"].isna()]
    return [f"{suite}: {_count(len(rows), 'config')} ran on another GPU or library version than the run "
            f"{'it is' if len(rows) == 1 else 'they are'} compared with ({change}): compared for accuracy only, "
            "not images/s" for (suite, change), rows in moved.groupby(["suite", "provenance"], sort=True)]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
