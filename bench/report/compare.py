"""Comparing the shown rows with one earlier run of the same suite, config by config, and flagging regressions.

A config's seeds are folded into a mean before and after. A change is a regression only when the drop exceeds
both the threshold and NOISE_K standard errors of the difference of the means (the seeds' pooled spread):
a drop the seeds' own noise could explain is not one. With one seed on each side and no history of earlier
runs nothing measures that noise, so the threshold alone applies, and the rows and the report say so (a history
of runs is judged in `bench.report.history`). Images/s follow the same rule, relative to the mean before, and
only between rows from the same GPU and library versions (PROVENANCE): across them a speed change says nothing
about bench. A seed that was ok and is not any more is always flagged.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bench.report.stats import NOISE_K, pooled_se
from bench.report.tables import GROUP, KEY_CONFIG, config_label

# Exact ties with the threshold (0.90 -> 0.89 at 0.01) must not flip on float rounding.
_EPS = 1e-9
# The provenance that must agree for images/s to be compared; accuracy is compared across it.
PROVENANCE = ("gpu_name", "torch_version", "torchvision_version", "cuda_version", "timm_version")
PREVIOUS = "previous run"  # the `rule` of a config judged against one earlier run
_COLUMNS = ["suite", "group_id", "model", "label", "seeds", "run_before", "run_after", "status",
            "top1_before", "top1_before_std", "top1_after", "top1_after_std", "top1_delta", "top1_allowed",
            "ips_before", "ips_after", "ips_rel", "ips_allowed", "threshold_only", "rule", "nights", "top1_p",
            "top1_p_holm", "ips_p", "ips_p_holm", "provenance", "lost", "regression", "cell_ids"]
_USED = ["cell_id", "run_id", "run_id_before", "status", "status_before", "top1", "top1_before", "images_per_s",
         "images_per_s_before", "moved"]


def compare_runs(current: pd.DataFrame, baseline: pd.DataFrame, extra: list[str], *,
                 top1_drop: float, speed_drop: float) -> pd.DataFrame:
    """One row per config with cells in both runs: mean top1 change (absolute), mean images/s change
    (relative), the drop each would have to exceed, and why it regressed ("" when it did not)."""
    if current.empty or baseline.empty:
        return pd.DataFrame(columns=_COLUMNS)
    before = baseline[["suite", "cell_id", "run_id", "status", "top1", "images_per_s", *_present(baseline)]]
    both = current.merge(before, on=["suite", "cell_id"], suffixes=("", "_before"))
    if both.empty:
        return pd.DataFrame(columns=_COLUMNS)
    both["moved"] = moved(both, [(c, f"{c}_before") for c in _present(baseline) if c in current])
    # Only the columns a config's line needs: the full rows have a hundred columns.
    rows = both[list(dict.fromkeys(GROUP + KEY_CONFIG + extra + _USED))]
    ok_before, ok_after = rows["status_before"] == "ok", rows["status"] == "ok"
    # Another GPU or library version on any seed that ran on both sides: the config's speed is not compared.
    rows = rows.assign(moved=rows["moved"].where(ok_before & ok_after, ""))
    same = ~rows.groupby(GROUP, sort=False)["moved"].transform(lambda m: (m != "").any())
    # a race's dropped config is an answer, not a lost seed: it is compared on nothing, and never flagged
    rows = rows.assign(lost=ok_before & ~ok_after & (rows["status"] != "dropped"),
                       t_b=rows["top1_before"].where(ok_before), t_a=rows["top1"].where(ok_after),
                       i_b=rows["images_per_s_before"].where(ok_before & same),
                       i_a=rows["images_per_s"].where(ok_after & same))
    by = rows.groupby(GROUP, sort=False)
    out = by.head(1).set_index(GROUP)[["model"]].assign(
        label=[config_label(r, extra) for _, r in by.head(1).iterrows()], seeds=by.size(),
        run_before=by["run_id_before"].agg(joined), run_after=by["run_id"].agg(joined),
        status=by["status_before"].agg(_statuses) + " → " + by["status"].agg(_statuses),
        cell_ids=by["cell_id"].agg(joined), provenance=by["moved"].agg(lambda m: "; ".join(sorted(set(m) - {""}))),
    )
    top1 = _change(by, "t_b", "t_a", top1_drop, relative=False)
    ips = _change(by, "i_b", "i_a", speed_drop, relative=True)
    out = out.assign(top1_before=top1["before"], top1_before_std=top1["before_std"], top1_after=top1["after"],
                     top1_after_std=top1["after_std"], top1_delta=top1["delta"], top1_allowed=top1["allowed"],
                     ips_before=ips["before"], ips_after=ips["after"], ips_rel=ips["delta"], ips_allowed=ips["allowed"],
                     rule=PREVIOUS, nights=1, top1_p=np.nan, top1_p_holm=np.nan, ips_p=np.nan, ips_p_holm=np.nan)
    # "Threshold only" when every metric that was measured had one seed on each side.
    measured = np.column_stack([top1["delta"].notna(), ips["delta"].notna()])
    alone = np.column_stack([top1["threshold_only"], ips["threshold_only"]])
    out["threshold_only"] = measured.any(axis=1) & (alone | ~measured).all(axis=1)
    lost = rows[rows["lost"]].groupby(GROUP)["status"].agg(["size", joined])
    out["lost"] = [f"{lost.at[k, 'size']} of {out.at[k, 'seeds']} seeds now {lost.at[k, 'joined']} (was ok)"
                   if k in lost.index else "" for k in out.index]
    out["regression"] = ["; ".join(filter(None, [out.at[k, "lost"], *_reasons(k, top1, ips)])) for k in out.index]
    return finish(out.reset_index())


def finish(out: pd.DataFrame) -> pd.DataFrame:
    """The comparison's columns in order, regressions first, then the biggest accuracy losses."""
    out = out.sort_values(["regression", "top1_delta"], ascending=[False, True], na_position="last", kind="stable")
    return out[_COLUMNS].reset_index(drop=True)


def moved(rows: pd.DataFrame, pairs: list[tuple[str, str]]) -> pd.Series:
    """Per row, which provenance differs between the two sides ("torch_version 2.3.0 → 2.4.0"), "" for none.
    A value recorded on one side only counts as a difference (nothing says they agree); unrecorded on both not."""
    texts = [[f"{now} {then_v} → {now_v}" if now_v != then_v else ""
              for now_v, then_v in zip(_text(rows[now]), _text(rows[then]))] for now, then in pairs]
    text = ["; ".join(filter(None, parts)) for parts in zip(*texts)] if texts else [""] * len(rows)
    return pd.Series(text, index=rows.index, dtype=object)


def _text(values: pd.Series) -> list[str]:
    return ["?" if pd.isna(v) else str(v) for v in values]


def _present(rows: pd.DataFrame) -> list[str]:
    return [c for c in PROVENANCE if c in rows]


def _change(by, before: str, after: str, threshold: float, *, relative: bool) -> pd.DataFrame:
    """Per config: means before and after, the change, and the drop it must exceed: max(threshold, NOISE_K x SE)."""
    stats = by.agg(before=(before, "mean"), after=(after, "mean"), before_std=(before, "std"),
                   after_std=(after, "std"), n_b=(before, "count"), n_a=(after, "count"))
    scale = stats["before"].where(stats["before"] != 0) if relative else 1.0
    se = pd.Series(pooled_se(stats["n_b"], stats["before_std"] ** 2, stats["n_a"], stats["after_std"] ** 2),
                   index=stats.index)
    noise = NOISE_K * se / scale
    delta = (stats["after"] - stats["before"]) / scale
    stats["delta"] = delta
    stats["threshold_only"] = noise.isna()
    stats["allowed"] = noise.clip(lower=threshold).fillna(threshold)
    stats["flag"] = delta.notna() & (-delta > stats["allowed"] + _EPS)
    return stats


def _reasons(key: tuple, top1: pd.DataFrame, ips: pd.DataFrame) -> list[str]:
    reasons = []
    if top1.at[key, "flag"]:
        reasons.append(f"top1 {100 * top1.at[key, 'delta']:+.2f} pts (allowed drop {_allowed(top1.loc[key], ' pts', 2)})")
    if ips.at[key, "flag"]:
        reasons.append(f"images/s {100 * ips.at[key, 'delta']:+.1f}% (allowed drop {_allowed(ips.loc[key], '%', 1)})")
    return reasons


def _allowed(change: pd.Series, unit: str, digits: int) -> str:
    text = f"{100 * change['allowed']:.{digits}f}{unit}"
    return f"{text}: one seed and no history, so the threshold alone" if change["threshold_only"] else text


def joined(values: pd.Series) -> str:
    return ", ".join(sorted(set(values.astype(str))))


def _statuses(values: pd.Series) -> str:
    counts = values.astype(str).value_counts()
    return ", ".join(s if n == len(values) else f"{n} {s}" for s, n in counts.items())


def regression_lines(comparison: pd.DataFrame) -> list[str]:
    """One human line per flagged config, for the top of the report and the CLI."""
    lines = []
    for _, r in comparison[comparison["regression"] != ""].iterrows():
        before = "n/a" if pd.isna(r["top1_before"]) else f"{100 * r['top1_before']:.2f}%"
        after = "n/a" if pd.isna(r["top1_after"]) else f"{100 * r['top1_after']:.2f}%"
        seeds = f"{r['seeds']} seed{'s' if r['seeds'] != 1 else ''}"
        # A history's "before" is its mean over runs; one run's is that run's mean over seeds.
        runs = f"{r['run_before']}" if r["rule"] != PREVIOUS else f"run {r['run_before']}"
        lines.append(
            f"{r['suite']}: {r['label']} (config {r['group_id']}, {seeds}): {r['regression']} "
            f"[mean top1 {before} -> {after}; {runs} -> run {r['run_after']}]"
        )
    return lines
