"""A race: successive halving over a suite's configs, decided on validation top-1 at rungs measured in epochs.

Every config trains to the first rung and pauses with its state saved; the best 1/eta go on from there to the
next rung; and so on, until the survivors finish their epochs. A racer is a backbone config as the report's
leaderboard folds it: its seeds and its tuned values (`TUNED_FIELDS`, an lr sweep) race as one, scored by its
best tuned config's mean over seeds. Each cell's LR schedule spans its full `epochs` from its first step, so a
survivor's row is the row a full grid would have given it.

The rule never drops what it cannot tell apart: a racer within the noise of the cut-line (the k-th best score)
survives. With two seeds or more the noise is NOISE_K standard errors of the difference of the two means, the
seeds' variance pooled over every racer at the rung (two seeds give each racer one degree of freedom: its own
spread is luck, and two seeds that happen to agree would get a band of nothing); with one seed nothing measures
it and the suite's `margin` (default 1 point) stands in. The risk: a config
that learns slowly and overtakes late is dropped at an early rung (the race's known failure, ASHA's too);
`bench race replay` measures how often that would have happened on grids already run.

The rule is pure arithmetic on epoch tables (`cut`, `rung_scores`); `RaceRun` drives the rungs through the
runner's own way of running and recording cells (bench/runner.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.atomic import atomic_text
from bench.store import ResultStore
from bench.suite import TUNED_FIELDS, Cell, RaceSpec

NOISE_K = 2.0  # standard errors of the difference within which two racers count as tied (as the report's)


def racer_key(cell: Cell) -> str:
    """The racer a cell belongs to: its config without seed and tuned values."""
    return cell._identity(frozenset({"seed", "cell_timeout_s", "checkpoint", *TUNED_FIELDS}))


def rungs_for(spec: RaceSpec, epochs: int) -> list[int]:
    """Epochs at which configs are compared, all below `epochs`: the suite's, or 1, eta, eta^2 ..."""
    if spec.rungs is not None:
        return sorted({r for r in spec.rungs if r < epochs})
    out, r = [], 1
    while r < epochs:
        out.append(r)
        r *= spec.eta
    return out


def races(cell: Cell) -> bool:
    """Throughput cells never race: they have no validation score to race on."""
    return cell.mode == "train" and cell.val_fraction > 0


@dataclass(frozen=True)
class Score:
    """A racer's standing at a rung: its best tuned config's mean validation top-1 over seeds, that mean's
    standard error (None with one seed), and the number of seeds behind it."""

    racer: str
    mean: float
    se: float | None
    seeds: int


@dataclass
class Cut:
    """One rung's decision: who goes on, who is dropped, where the line was and how wide the noise band."""

    kept: list[str]
    dropped: list[str]
    line: float
    band: dict[str, float] = field(default_factory=dict)  # racer -> the gap it was allowed below the line


def score(racer: str, values: dict[str, list[float]]) -> Score | None:
    """`values`: tuned config (group id) -> its seeds' validation top-1 at the rung. None without any value."""
    best: Score | None = None
    for seeds in values.values():
        seeds = [v for v in seeds if v is not None and not math.isnan(v)]
        if not seeds:
            continue
        mean = sum(seeds) / len(seeds)
        se = None
        if len(seeds) >= 2:
            var = sum((v - mean) ** 2 for v in seeds) / (len(seeds) - 1)
            se = math.sqrt(var / len(seeds))
        if best is None or mean > best.mean:
            best = Score(racer, mean, se, len(seeds))
    return best


def cut(scores: Sequence[Score], eta: int, margin: float) -> Cut:
    """Keep the best ceil(n/eta), and every other racer within noise of the k-th best (the cut-line)."""
    ranked = sorted(scores, key=lambda s: (-s.mean, s.racer))
    if not ranked:
        return Cut([], [], math.nan)
    k = max(1, math.ceil(len(ranked) / eta))
    line = ranked[k - 1]
    kept, dropped, band = [s.racer for s in ranked[:k]], [], {}
    pooled = pooled_variance(ranked)
    for s in ranked[k:]:
        allowed = _band(s, line, margin, pooled)
        band[s.racer] = allowed
        (kept if line.mean - s.mean <= allowed + 1e-12 else dropped).append(s.racer)
    return Cut(kept, dropped, line.mean, band)


def pooled_variance(scores: Sequence[Score]) -> float | None:
    """The seeds' variance pooled over the racers with two seeds or more (each weighted by its degrees of freedom,
    seeds - 1), as an analysis of variance pools it: one seed-to-seed noise for the rung. None without any."""
    free = [(s.seeds - 1, s.se ** 2 * s.seeds) for s in scores if s.se is not None and s.seeds >= 2]
    total = sum(df for df, _ in free)
    return sum(df * var for df, var in free) / total if total else None


def _band(s: Score, line: Score, margin: float, pooled: float | None) -> float:
    """How far below the line a racer may be and still count as tied: the seeds' pooled noise where both have two
    seeds or more (never less than the margin), the margin otherwise."""
    if s.se is None or line.se is None or pooled is None:
        return margin
    return max(margin, NOISE_K * math.sqrt(pooled / s.seeds + pooled / line.seeds))


def val_at(epochs: Iterable[dict], epoch_count: int) -> float | None:
    """Validation top-1 after `epoch_count` epochs (the epoch row numbered epoch_count - 1), else the last
    epoch's when the cell ended earlier (a step cap, a target reached)."""
    rows = sorted((e for e in epochs if e.get("val_top1") is not None), key=lambda e: e["epoch"])
    at = [e for e in rows if e["epoch"] == epoch_count - 1]
    if at:
        return float(at[0]["val_top1"])
    before = [e for e in rows if e["epoch"] < epoch_count]
    return float(before[-1]["val_top1"]) if before else None


def rung_scores(cells: Sequence[Cell], epochs_of: dict[str, list[dict]], rung_epochs: int) -> list[Score]:
    """Every racer's score at a rung from its cells' epoch tables (cell id -> epoch rows)."""
    by_racer: dict[str, dict[str, list[float]]] = {}
    for cell in cells:
        value = val_at(epochs_of.get(cell.id, []), rung_epochs)
        by_racer.setdefault(racer_key(cell), {}).setdefault(cell.group_id, []).append(value)
    return [s for racer, values in by_racer.items() if (s := score(racer, values)) is not None]


# --- the race as the runner drives it ------------------------------------------------------------------------


class RaceLog:
    """The cuts made so far, kept in the results folder (`state/race.json`) and rewritten atomically after each
    rung: a race killed at any point resumes with the same decisions, and cuts no rung twice."""

    def __init__(self, path: Path, key: str, warn: Callable[[str], None]):
        self.path, self.key, self.cuts = path, key, []
        try:
            saved = json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            saved = None
            warn(f"race log {path} is unreadable; the race starts its cuts again (no finished row is lost)")
        if isinstance(saved, dict) and saved.get("key") == key and isinstance(saved.get("cuts"), list):
            self.cuts = saved["cuts"]
        elif saved is not None:
            warn(f"race log {path} belongs to another race (the suite, its cells or race settings changed); "
                 "this race starts its cuts again")

    def add(self, decision: dict) -> None:
        self.cuts.append(decision)
        atomic_text(self.path, json.dumps({"key": self.key, "cuts": self.cuts}, indent=1))  # synced: the cuts decide


@dataclass
class RaceRun:
    """One race over `cells` (every raced cell `--only` chose): `run(cells, pause_at, rung)` runs cells, recording
    every outcome but a pause and returning the ids it recorded; `done` holds the cells that already have a row."""

    spec: RaceSpec
    cells: list[Cell]
    store: ResultStore
    suite: str
    done: set[str]
    run: Callable[[list[Cell], int | None, int], set[str]]
    drop: Callable[[Cell, int, str], None]
    report: Callable[[dict], None]

    def go(self) -> None:
        rungs = rungs_for(self.spec, max(c.epochs for c in self.cells))
        log = RaceLog(self.store.race_log(self.suite), self._key(rungs), self._warn)
        alive = {racer_key(c) for c in self.cells}
        for k, rung in enumerate(rungs):
            if k < len(log.cuts):
                decision = log.cuts[k]
            else:
                decision = self._rung(k, rung, alive, len(rungs))
                log.add(decision)
            for cell in self.cells:
                if racer_key(cell) in decision["dropped"] and cell.id not in self.done:
                    self.drop(cell, k, _dropped_why(k, rung, decision, racer_key(cell)))
                    self.done.add(cell.id)
            alive &= set(decision["kept"])
        self.done |= self.run([c for c in self.cells if racer_key(c) in alive and c.id not in self.done], None, len(rungs))

    def _rung(self, k: int, rung: int, alive: set[str], total: int) -> dict:
        """Run every live config to `rung` epochs (pausing there), then cut."""
        racing = [c for c in self.cells if racer_key(c) in alive]
        behind = [c for c in racing if c.id not in self.done and self._epochs_done(c) < min(rung, c.epochs)]
        self.done |= self.run(behind, rung, k)
        scores = rung_scores(racing, self._epochs_of(racing), rung)
        decided = cut(scores, self.spec.eta, self.spec.margin)
        self.report({"kind": "race", "text": f"race rung {k + 1} of {total} ({rung} epoch{'s' if rung > 1 else ''}): "
                     f"{len(decided.kept)} of {len(scores)} configs go on, cut-line {100 * decided.line:.2f}%"})
        return {"rung": k, "epochs": rung, "kept": decided.kept, "dropped": decided.dropped, "line": decided.line,
                "band": decided.band, "scores": {s.racer: s.mean for s in scores}}

    def _epochs_done(self, cell: Cell) -> int:
        meta = self.store.saved_state(self.suite, cell.id)
        return int(meta.get("epochs_done", 0)) if meta else 0

    def _epochs_of(self, cells: list[Cell]) -> dict[str, list[dict]]:
        """Each cell's epoch rows so far: from its saved state (paused) or its newest row (finished)."""
        out = self.store.latest_epochs(self.suite, [c.id for c in cells if c.id in self.done])
        for cell in cells:
            meta = self.store.saved_state(self.suite, cell.id)
            if meta is not None:
                out[cell.id] = meta["loop"].get("epochs", [])
        return out

    def _key(self, rungs: list[int]) -> str:
        body = [self.spec.eta, rungs, self.spec.margin, sorted(c.id for c in self.cells)]
        return hashlib.sha256(json.dumps(body).encode()).hexdigest()[:16]

    def _warn(self, text: str) -> None:
        self.report({"kind": "warning", "text": text})


def _dropped_why(k: int, rung: int, decision: dict, racer: str) -> str:
    mine = decision["scores"].get(racer)
    said = "no validation score" if mine is None else f"validation top-1 {100 * mine:.2f}%"
    band = decision["band"].get(racer)
    tied = f", more than the {100 * band:.2f} pts it could be tied within" if band is not None else ""
    return (f"dropped by the race at rung {k + 1} ({rung} epochs): {said}, below the cut-line "
            f"{100 * decision['line']:.2f}%{tied}")


@dataclass(frozen=True)
class Plan:
    """What a race will do at most, before it runs: its rungs, the configs alive at each (no ties assumed), and
    the device time against the full grid's, from per-cell estimates of the whole cell's time."""

    rungs: list[int]
    alive: list[int]  # configs entering each rung, then the survivors that finish
    race_s: float
    grid_s: float


def plan(cells: Sequence[Cell], spec: RaceSpec, seconds: Sequence[float | None]) -> Plan:
    """The race over the cells that race, each costing `seconds` for its full epochs (spread evenly over them);
    the share alive at a rung pays that share of every config's epochs up to the next rung."""
    raced = [(c, s or 0.0) for c, s in zip(cells, seconds) if races(c)]
    if not raced:
        return Plan([], [], 0.0, 0.0)
    rungs = rungs_for(spec, max(c.epochs for c, _ in raced))
    alive = [len({racer_key(c) for c, _ in raced})]
    for _ in rungs:
        alive.append(max(1, math.ceil(alive[-1] / spec.eta)))
    race_s, start = 0.0, 0
    for share, end in zip((a / alive[0] for a in alive), [*rungs, None]):
        race_s += share * sum(s * (min(c.epochs, end or c.epochs) - min(c.epochs, start)) / c.epochs for c, s in raced)
        start = end or start
    return Plan(rungs, alive, race_s, sum(s for _, s in raced))
