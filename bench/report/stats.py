"""The report's statistics: McNemar's paired test on the same test images, Holm's correction, and the spread
a change must exceed before it counts as a regression.

Plain Python and numpy (math.comb, math.erfc): no SciPy for three formulas.
"""

from __future__ import annotations

import base64
import binascii
import math
from fractions import Fraction

import numpy as np
import pandas as pd

ALPHA = 0.05  # significance level of the McNemar marks (after Holm's correction)
EXACT_MAX = 1000  # up to this many discordant pairs the binomial test is exact; above, chi-squared is accurate
NOISE_K = 2.0  # a regression must exceed NOISE_K standard errors of the difference of means (and the threshold)


def decode_correct(text: object, count: object) -> np.ndarray | None:
    """The `test_correct` column as a bool vector of `count` test images, or None when it is missing or does not
    decode to exactly that many bits (old rows, failed cells, a test set of another size).

    The same decoding as `bench.train.metrics.unpack_correct` (the format's owner), written here with numpy
    alone so that the report never imports torch; a test checks the two agree.
    """
    if not isinstance(text, str) or not text or pd.isna(count):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    n = int(count)
    if len(raw) != (n + 7) // 8:
        return None
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=n).astype(bool)


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided p-value of McNemar's test for b and c discordant pairs (b: only the first right, c: only the second).

    Exact (binomial, p = 1/2) up to EXACT_MAX discordant pairs, computed in integers so it never underflows;
    above, the chi-squared statistic with continuity correction, whose tail is erfc(sqrt(chi2 / 2)).
    """
    n = b + c
    if n == 0:
        return 1.0
    if n <= EXACT_MAX:
        tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
        return float(min(Fraction(1), Fraction(2 * tail, 2**n)))
    chi2 = (abs(b - c) - 1) ** 2 / n
    return math.erfc(math.sqrt(chi2 / 2))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): the family-wise error stays below alpha."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def pooled_se(n_before: np.ndarray, var_before: np.ndarray, n_after: np.ndarray, var_after: np.ndarray) -> np.ndarray:
    """Standard error of the difference of two means with the seeds' pooled variance (counts and sample variances
    per config); NaN without two seeds' worth of spread (one seed on each side: nothing says how noisy it is)."""
    n_b, n_a = np.asarray(n_before, dtype=float), np.asarray(n_after, dtype=float)
    squares = (np.nan_to_num(np.asarray(var_before, dtype=float)) * np.maximum(n_b - 1, 0)
               + np.nan_to_num(np.asarray(var_after, dtype=float)) * np.maximum(n_a - 1, 0))
    dof = n_b + n_a - 2
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.sqrt(squares / dof * (1 / n_b + 1 / n_a))
    return np.where((dof >= 1) & (n_b > 0) & (n_a > 0), se, np.nan)


# Two cells saw the same test images when these agree (and each recorded exactly test_images bits).
TEST_SET = ("dataset", "test_images", "test_subset")


def _correct_by_seed(trained: pd.DataFrame, groups: set[tuple[str, str]]) -> dict[tuple[str, str], dict]:
    """(suite, group_id) -> {seed: (test-set key, bool vector)} for the cells of `groups` that recorded one."""
    out: dict[tuple[str, str], dict] = {}
    columns = ["suite", "group_id", "seed", "test_correct", "test_images", *TEST_SET]
    present = trained[[c for c in dict.fromkeys(columns) if c in trained]]
    for row in present.to_dict("records"):  # not iterrows: a Series per row of a hundred columns is slow
        key = (row["suite"], row["group_id"])
        vector = decode_correct(row.get("test_correct"), row.get("test_images")) if key in groups else None
        if vector is not None:
            test_set = tuple(str(row.get(c)) for c in TEST_SET)
            out.setdefault(key, {})[int(row["seed"])] = (test_set, vector)
    return out


def versus_best(board: pd.DataFrame, trained: pd.DataFrame) -> pd.DataFrame:
    """McNemar's test of every leaderboard row against #1 (the validation choice) on the same test images.

    Matched seeds (the same seed in both, the same test set) are pooled: b counts images only #1 got right,
    c images only the other did. The p-values are Holm-corrected over the rows compared. `vs_best` reads
    "best" for #1, "≈ best" when the other is not significantly different, "worse" / "better" when it is
    (better: test disagrees with validation's choice), and "" where no paired data exist (rows from before
    test_correct, a different test set)."""
    n = len(board)
    seeds, b, c, p, q, marks = [0] * n, [pd.NA] * n, [pd.NA] * n, [math.nan] * n, [math.nan] * n, [""] * n
    ranks = board["rank"].fillna(0).to_numpy(dtype=int) if n else np.zeros(0, dtype=int)
    first = np.flatnonzero(ranks == 1)
    if len(first):
        best = int(first[0])
        keys = list(zip(board["suite"], board["group_id"]))
        vectors = _correct_by_seed(trained, set(keys))
        mine = vectors.get(keys[best], {})
        for i, key in enumerate(keys):
            theirs = vectors.get(key, {})
            matched = [s for s in mine if s in theirs and mine[s][0] == theirs[s][0]]
            if i != best and matched:
                seeds[i] = len(matched)
                b[i] = sum(int((mine[s][1] & ~theirs[s][1]).sum()) for s in matched)
                c[i] = sum(int((~mine[s][1] & theirs[s][1]).sum()) for s in matched)
                p[i] = mcnemar_p(b[i], c[i])
        compared = [i for i in range(n) if seeds[i]]
        for i, adjusted in zip(compared, holm([p[i] for i in compared])):
            q[i] = adjusted
            marks[i] = ("worse" if b[i] > c[i] else "better") if adjusted < ALPHA else "≈ best"
        if compared:
            marks[best] = "best"
    return board.assign(paired_seeds=seeds, discordant_b=pd.array(b, dtype="Int64"),
                        discordant_c=pd.array(c, dtype="Int64"), p_value=p, p_holm=q, vs_best=marks)
