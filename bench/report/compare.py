"""Comparing the shown rows with an earlier run of the same suite, cell by cell, and flagging regressions."""

from __future__ import annotations

import pandas as pd

from bench.report.tables import config_label

# Exact ties with the threshold (0.90 -> 0.89 at 0.01) must not flip on float rounding.
_EPS = 1e-9
_COLUMNS = ["suite", "cell_id", "model", "label", "seed", "run_before", "run_after", "status_before", "status_after",
            "top1_before", "top1_after", "top1_delta", "ips_before", "ips_after", "ips_rel", "regression"]


def compare_runs(current: pd.DataFrame, baseline: pd.DataFrame, extra: list[str], *,
                 top1_drop: float, speed_drop: float) -> pd.DataFrame:
    """One row per cell present in both: top1 change (absolute), images/s change (relative), and why it regressed."""
    if current.empty or baseline.empty:
        return pd.DataFrame(columns=_COLUMNS)
    before = baseline[["suite", "cell_id", "run_id", "status", "top1", "images_per_s"]]
    both = current.merge(before, on=["suite", "cell_id"], suffixes=("", "_before"))
    out = pd.DataFrame({
        "suite": both["suite"], "cell_id": both["cell_id"], "model": both["model"],
        "label": [config_label(r, extra) for _, r in both.iterrows()], "seed": both["seed"],
        "run_before": both["run_id_before"], "run_after": both["run_id"],
        "status_before": both["status_before"], "status_after": both["status"],
        "top1_before": both["top1_before"], "top1_after": both["top1"],
        "ips_before": both["images_per_s_before"], "ips_after": both["images_per_s"],
    })
    out["top1_delta"] = out["top1_after"] - out["top1_before"]
    out["ips_rel"] = out["ips_after"] / out["ips_before"] - 1
    out["regression"] = [_why(r, top1_drop, speed_drop) for _, r in out.iterrows()]
    # Regressions first, then the biggest accuracy losses.
    out = out.sort_values(["regression", "top1_delta"], ascending=[False, True], na_position="last", kind="stable")
    return out[_COLUMNS].reset_index(drop=True)


def _why(row: pd.Series, top1_drop: float, speed_drop: float) -> str:
    reasons = []
    if row["status_before"] == "ok" and row["status_after"] != "ok":
        reasons.append(f"now {row['status_after']} (was ok)")
    if pd.notna(row["top1_delta"]) and -row["top1_delta"] > top1_drop + _EPS:
        reasons.append(f"top1 {100 * row['top1_delta']:+.2f} pts")
    if pd.notna(row["ips_rel"]) and -row["ips_rel"] > speed_drop + _EPS:
        reasons.append(f"images/s {100 * row['ips_rel']:+.1f}%")
    return "; ".join(reasons)


def regression_lines(comparison: pd.DataFrame) -> list[str]:
    """One human line per flagged cell, for the top of the report and the CLI."""
    lines = []
    for _, r in comparison[comparison["regression"] != ""].iterrows():
        before = "n/a" if pd.isna(r["top1_before"]) else f"{100 * r['top1_before']:.2f}%"
        after = "n/a" if pd.isna(r["top1_after"]) else f"{100 * r['top1_after']:.2f}%"
        lines.append(
            f"{r['suite']}: {r['label']} seed {r['seed']} (cell {r['cell_id']}): {r['regression']} "
            f"[top1 {before} -> {after}; run {r['run_before']} -> {r['run_after']}]"
        )
    return lines
