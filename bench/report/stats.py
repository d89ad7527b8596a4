"""The report's statistics: the paired sign test on the same test images (McNemar's test when one seed ran),
Holm's correction, Student's t tail, and the spread a change must exceed before it counts as a regression.

Plain Python and numpy (math.comb, math.lgamma, math.erfc): no SciPy for a handful of formulas.
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
    """Two-sided p-value of the sign test for b positive and c negative paired differences (McNemar's test when
    they are the images only the first got right and only the second did).

    Exact (binomial, p = 1/2) up to EXACT_MAX nonzero differences, computed in integers so it never underflows;
    above, the chi-squared statistic with continuity correction, whose tail is erfc(sqrt(chi2 / 2)). The correction
    never makes the statistic negative (b = c: chi2 0, p 1).
    """
    n = b + c
    if n == 0:
        return 1.0
    if n <= EXACT_MAX:
        tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
        return float(min(Fraction(1), Fraction(2 * tail, 2**n)))
    chi2 = max(0, abs(b - c) - 1) ** 2 / n
    return math.erfc(math.sqrt(chi2 / 2))


def holm(p_values: object) -> np.ndarray:
    """Holm's step-down adjusted p-values (same order as given): the family-wise error stays below alpha.
    A 2-D array is many families, one per row (the nightly simulation judges many nights at once)."""
    p = np.asarray(p_values, dtype=float)
    m = p.shape[-1]
    order = np.argsort(p, axis=-1, kind="stable")
    ranked = np.take_along_axis(p, order, axis=-1) * (m - np.arange(m))
    adjusted = np.empty_like(p)
    np.put_along_axis(adjusted, order, np.minimum(1.0, np.maximum.accumulate(ranked, axis=-1)), axis=-1)
    return adjusted


def t_sf(t: object, dof: object) -> np.ndarray:
    """P(T > t) for Student's t with `dof` degrees of freedom, elementwise over arrays.

    Half the regularised incomplete beta I_x(dof/2, 1/2) at x = dof / (dof + t^2): the continued fraction keeps
    its relative accuracy far into the tail (p = 1e-12), where 1 - cdf would have lost it."""
    t, dof = np.broadcast_arrays(np.asarray(t, dtype=float), np.asarray(dof, dtype=float))
    half = 0.5 * _betainc(dof / 2, np.full(dof.shape, 0.5), dof / (dof + t * t))
    return np.where(t > 0, half, 1 - half)


def t_isf(p: object, dof: object) -> np.ndarray:
    """The t that Student's t with `dof` degrees of freedom exceeds with probability p (p < 1/2), by bisection."""
    p, dof = np.broadcast_arrays(np.asarray(p, dtype=float), np.asarray(dof, dtype=float))
    low, high = np.zeros(p.shape), np.full(p.shape, 1e7)
    for _ in range(80):  # 1e7 / 2^80: far below any difference a report shows
        mid = (low + high) / 2
        above = t_sf(mid, dof) > p
        low, high = np.where(above, mid, low), np.where(above, high, mid)
    return (low + high) / 2


def _betainc(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Regularised incomplete beta I_x(a, b), by the continued fraction (modified Lentz) on the side of the
    symmetry I_x(a, b) = 1 - I_(1-x)(b, a) where it converges fast."""
    flip = x > (a + 1) / (a + b + 2)
    a, b, x = np.where(flip, b, a), np.where(flip, a, b), np.where(flip, 1 - x, x)
    with np.errstate(divide="ignore"):  # x = 0 (t infinite): log 0, and the term is 0 as it should be
        front = np.exp(_lgamma(a + b) - _lgamma(a) - _lgamma(b) + a * np.log(x) + b * np.log1p(-x)) / a
    tiny = 1e-300
    c, d = np.ones(x.shape), 1 - (a + b) * x / (a + 1)
    d = 1 / np.where(np.abs(d) < tiny, tiny, d)
    h = d.copy()
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d, c = 1 + num * d, 1 + num / c
            d, c = 1 / np.where(np.abs(d) < tiny, tiny, d), np.where(np.abs(c) < tiny, tiny, c)
            h = h * d * c
        if np.all(np.abs(d * c - 1) < 1e-14):
            break
    direct = front * h
    return np.where(flip, 1 - direct, direct)


def _lgamma(values: np.ndarray) -> np.ndarray:
    """math.lgamma elementwise, once per distinct value (a report's degrees of freedom are a handful of numbers)."""
    distinct, where = np.unique(values, return_inverse=True)
    return np.array([math.lgamma(v) for v in distinct.ravel()])[where].reshape(values.shape)


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
    """A paired test of every leaderboard row against #1 (the validation choice) on the same test images.

    The unit is the test image, never the (image, seed) pair: per image, d = the mean over matched seeds (the
    same seed in both, the same test set) of #1 right minus the other right. b counts images with d > 0, c those
    with d < 0, and the p-value is the exact sign test on them (McNemar's test when one seed is matched), so
    seeds that agree add no evidence. The p-values are Holm-corrected over the rows compared. `vs_best` reads
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
            d = _mean_difference(mine, vectors.get(key, {})) if i != best else None
            if d is not None:
                seeds[i], b[i], c[i] = d[0], int((d[1] > 0).sum()), int((d[1] < 0).sum())
                p[i] = mcnemar_p(b[i], c[i])
        compared = [i for i in range(n) if seeds[i]]
        for i, adjusted in zip(compared, holm([p[i] for i in compared])):
            q[i] = adjusted
            marks[i] = ("worse" if b[i] > c[i] else "better") if adjusted < ALPHA else "≈ best"
        if compared:
            marks[best] = "best"
    return board.assign(paired_seeds=seeds, discordant_b=pd.array(b, dtype="Int64"),
                        discordant_c=pd.array(c, dtype="Int64"), p_value=p, p_holm=q, vs_best=marks)


def _mean_difference(mine: dict, theirs: dict) -> tuple[int, np.ndarray] | None:
    """(matched seeds, per image the mean over them of mine right - theirs right), or None when no seed matches.

    Seeds match when both ran them on the same test set; should matched seeds disagree on the test set (a
    dataset changed between runs), the test set most of them share is used, so an image is one image."""
    matched = [s for s in mine if s in theirs and mine[s][0] == theirs[s][0]]
    if not matched:
        return None
    sets = [mine[s][0] for s in matched]
    common = max(sets, key=sets.count)  # ties: the first seed's
    matched = [s for s in matched if mine[s][0] == common]
    d = sum(mine[s][1].astype(np.int8) - theirs[s][1].astype(np.int8) for s in matched) / len(matched)
    return len(matched), d
