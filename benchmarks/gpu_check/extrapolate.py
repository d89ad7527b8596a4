"""cifar_full's run time on this machine, extrapolated through `bench validate`'s calibration from the rows in
--results (the GPU check's step `suite`); a process of its own, so the check itself never creates a CUDA context
on the GPU its cells measure.

    python -m benchmarks.gpu_check.extrapolate --results DIR --json OUT [--suite suites/cifar_full.yaml] [--models A,B]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.gpu_check.config import CHECKOUT


def extrapolate(suite_path: Path, results: Path, models: list[str] | None = None) -> dict:
    """The suite's estimated seconds on this machine's device, in all and by resolution, with the fit's fixed cost
    per cell (setup_s: start, data, warm-up, evaluation overheads), from which the share of useful work follows."""
    from bench.suite import load_suite
    from bench.validate import estimate, resolve_cells, target_device

    cells = [c for c in resolve_cells(load_suite(suite_path)) if not models or c.model.split(":", 1)[-1] in models]
    cost = estimate(cells, results=results, target=target_device())
    by_side: dict[int, float] = {}
    for c in cost.cells:
        by_side[c.cell.resolution] = by_side.get(c.cell.resolution, 0.0) + (c.seconds or 0.0)
    return {"suite": str(suite_path), "cells": len(cells), "total_s": cost.total_s, "setup_s": cost.fit.setup_s,
            "fit_rows": cost.fit.rows, "unknown_cells": sum(c.seconds is None for c in cost.cells),
            "target": cost.target.label, "calibration": cost.calibration,
            "by_resolution_s": {str(k): v for k, v in sorted(by_side.items())}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check.extrapolate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--suite", type=Path, default=CHECKOUT / "suites" / "cifar_full.yaml")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--models", help="only these models' cells, e.g. resnet50,efficientnet_b0")
    args = parser.parse_args(argv)
    found = extrapolate(args.suite, args.results, args.models.split(",") if args.models else None)
    args.json.write_text(json.dumps(found, indent=1))
    print(json.dumps(found))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
