"""The race against the full grid on the real CIFAR-10 images (issue 21): both in one go, then the replay.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.race [--train-per-class 100] [--epochs 5] [--out race.md]

Twelve configs (three small torchvision backbones x four freeze depths), two seeds each, trained from scratch (no
ImageNet weights on these machines) at 32 px on a subset of the JPEGs, small enough for a 2-core CPU in about
20 minutes. SqueezeNet 1.1 rather than MobileNetV3-Small: the latter's BatchNorm momentum (0.01) keeps it at
chance in eval mode after so few steps (the smoke suite's finding), and SqueezeNet is the cheaper of the two. The full grid runs into one results folder
and the race (`RaceSpec`, successive halving on validation top-1) into another, on the same cells and seeds. The
goal: the race's pick is the grid's, or within the noise of it, for at most 35% of the grid's device-hours.
Device-hours are each row's train_s + eval_s (one device per cell); the replay (`bench.replay`, what `bench race
replay` prints) predicts the same from the grid's epoch rows alone, and other rules are replayed beside it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from bench import replay
from bench.runner import RunOptions, run_suite
from bench.store import ResultStore
from bench.suite import RaceSpec, expand, parse_suite
from benchmarks.common import ASSETS, table
from benchmarks.gpu_check.plumbing import unpack_cifar

MODELS = ["tv:resnet18", "tv:shufflenet_v2_x0_5", "tv:squeezenet1_1"]
FREEZES = ["none", 0.5, 2, "all"]  # all layers trained, the first half frozen, the last two trained, a linear probe
GOAL_SHARE = 0.35
# Other rules replayed on the same grid (no training): what each would have picked and spent.
OTHER_RULES = {"eta 2": RaceSpec(eta=2), "eta 4": RaceSpec(eta=4), "rungs 1": RaceSpec(rungs=[1]),
               "rungs 1,2": RaceSpec(rungs=[1, 2]), "rungs 2": RaceSpec(rungs=[2])}


def suite_for(folder: Path, args: argparse.Namespace, spec: RaceSpec | None):
    return parse_suite({
        "name": "race_cifar", "dataset": f"imagefolder:{folder}",
        "defaults": {"resolution": 32, "epochs": args.epochs, "batch_size": 64, "pretrained": False,
                     "val_fraction": 0.2, "infer_bench": "off"},
        "grid": {"model": args.models, "freeze": args.freezes, "seed": list(range(args.seeds))},
        **({"race": spec.model_dump()} if spec else {}),
    })


def timed_run(suite, results: Path, data_root: Path) -> float:
    started = time.perf_counter()
    run_suite(suite, expand(suite), RunOptions(results=results, data_root=data_root, devices=("cpu",)))
    return time.perf_counter() - started


def device_hours(cells: pd.DataFrame) -> float:
    """What the rows held a device for: training (every segment) and evaluation, one device per cell."""
    return float((cells["train_s"].fillna(0) + cells["eval_s"].fillna(0)).sum()) / 3600


def judge(grid: pd.DataFrame, raced: pd.DataFrame, margin: float) -> dict:
    """The race's pick (its best finished config) judged on the grid's numbers, as `bench race replay` judges."""
    grid_scores = replay.final_scores(grid[grid["status"] == "ok"])
    pick = replay.final_scores(raced[raced["status"] == "ok"])[0]
    on_grid = next(s for s in grid_scores if s.racer == pick.racer)
    best = grid_scores[0]
    return {"pick": pick.racer, "grid_pick": best.racer, "verdict": replay.verdict(best, on_grid, margin),
            "gap_pts": 100 * (best.mean - on_grid.mean), "pick_val": on_grid.mean, "best_val": best.mean}


def same_rows(grid: pd.DataFrame, raced: pd.DataFrame) -> tuple[int, int]:
    """Survivors whose row equals the grid's (test top-1 and the images it got right): (equal, survivors)."""
    ok = raced[raced["status"] == "ok"].set_index("cell_id")
    full = grid.set_index("cell_id")
    equal = sum(all(ok.loc[c, col] == full.loc[c, col] for col in ("top1", "test_correct")) for c in ok.index)
    return equal, len(ok)


def summary(args, grid, raced, walls, spec: RaceSpec) -> str:
    found = judge(grid.cells, raced.cells, spec.margin)
    hours = {"grid": device_hours(grid.cells), "race": device_hours(raced.cells)}
    share = hours["race"] / hours["grid"]
    equal, survivors = same_rows(grid.cells, raced.cells)
    said = f"worse by {found['gap_pts']:.2f} pts" if found["verdict"] == "worse" else found["verdict"]
    met = found["verdict"] != "worse" and share <= GOAL_SHARE
    dropped = raced.cells[raced.cells["status"] == "dropped"]
    lines = [
        f"{len(args.models) * len(args.freezes)} configs x {args.seeds} seeds, {args.epochs} epochs, "
        f"{args.train_per_class * 10} training JPEGs (20% of them validation), {args.test_per_class * 10} test; "
        f"race: eta {spec.eta}, rungs {spec.rungs or 'default'}, margin {spec.margin}",
        "",
        table([{"run": "grid", "cells": len(grid.cells), "device_h": hours["grid"], "wall_s": walls["grid"]},
               {"run": "race", "cells": f"{len(raced.cells)} ({len(dropped)} dropped)", "device_h": hours["race"],
                "wall_s": walls["race"]}], ["run", "cells", "device_h", "wall_s"]),
        "",
        f"race pick {found['pick']} (val {100 * found['pick_val']:.2f}%), grid pick {found['grid_pick']} "
        f"(val {100 * found['best_val']:.2f}%): {said}",
        f"device-hours: race {hours['race']:.4f} of grid {hours['grid']:.4f} ({100 * share:.1f}%); "
        f"wall: {walls['race']:.0f} s of {walls['grid']:.0f} s ({100 * walls['race'] / walls['grid']:.1f}%)",
        f"survivors' rows equal to the grid's: {equal} of {survivors}",
        f"goal (same or within noise, at most {100 * GOAL_SHARE:.0f}% of the device-hours): "
        f"{'met' if met else 'NOT met'}",
        "", "replay of the grid (bench race replay, from its epoch rows):", "", "```",
    ]
    replayed = replay.replay(grid.cells, grid.epochs, spec)
    lines += [replayed.table(), replayed.summary()]
    lines += ["```", "", table(other_rules(grid), ["rule", "pick", "verdict", "device_h", "of_grid_h", "share_%"])]
    return "\n".join(lines)


def other_rules(grid) -> list[dict]:
    out = []
    for name, rule in {"default (eta 3)": RaceSpec(), **OTHER_RULES}.items():
        done = replay.replay(grid.cells, grid.epochs, rule)
        said = f"worse by {100 * done.gap:.2f} pts" if done.verdict == "worse" else done.verdict
        out.append({"rule": name, "pick": done.pick, "verdict": said, "device_h": round(done.race_hours, 4),
                    "of_grid_h": round(done.grid_hours, 4), "share_%": 100 * done.race_hours / done.grid_hours})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--models", type=lambda t: t.split(","), default=MODELS, help="comma-separated")
    parser.add_argument("--freezes", type=lambda t: [_freeze(f) for f in t.split(",")], default=FREEZES,
                        help="comma-separated freeze depths (none, all, a fraction, a count)")
    parser.add_argument("--out", type=Path, help="also write the summary (Markdown) here")
    args = parser.parse_args()
    archive = ASSETS / "cifar10-jpg.tar.gz"
    if not archive.is_file():
        raise SystemExit(f"the CIFAR-10 JPEGs are not at {archive}; set BENCH_ASSETS to the folder that holds them")
    spec = RaceSpec()
    with tempfile.TemporaryDirectory(prefix="bench-race-") as tmp:
        root = Path(tmp)
        folder = unpack_cifar(archive, root / "cifar", (args.train_per_class, args.test_per_class))
        walls = {"grid": timed_run(suite_for(folder, args, None), root / "grid", root / "data"),
                 "race": timed_run(suite_for(folder, args, spec), root / "race", root / "data")}
        grid, raced = ResultStore(root / "grid").read(), ResultStore(root / "race").read()
        text = summary(args, grid, raced, walls, spec)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def _freeze(text: str):
    return text if text in ("none", "all") else float(text) if "." in text else int(text)


if __name__ == "__main__":
    main()
