"""Step `suite` of the GPU check (issue 23): a slice of cifar_full with the options that cut a suite's GPU time.

Every model of suites/cifar_full.yaml at its smallest and largest resolution there, one epoch on a subset, with
`cudnn_benchmark: auto` and `cuda_graphs: auto`, in three `bench run`s:

1. `large`: the large-side cells, one at a time, with the warm-up profiled into each cell's log
   (BENCH_PROFILE_WARMUP=1); beside them ResNet-50 and EfficientNet-B0 with cuDNN autotuning forced on (what it
   costs and buys), and ResNet-50 at the small side with CUDA graphs off (the eager twin of the graph cell);
2. `small`: the small-side cells one at a time: CUDA graphs alone;
3. `packed`: the same cells again with `--cells-per-gpu auto` (run 2's rows give their VRAM): what packing buys.

Then cifar_full's hours and share of useful work, extrapolated through `bench validate`'s calibration from every
row of this check (benchmarks/gpu_check/extrapolate.py, in a process of its own).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from benchmarks.gpu_check.config import CHECKOUT, Sizes
from benchmarks.gpu_check.plumbing import Context, Outcome, as_text, exit_problem, fmt, goal, md, num, tail

BASELINE_32PX = 4876.0  # ResNet-50, 32 px, batch 128, bf16, eager: images/s on an H200 (benchmarks/RESULTS.md)
WARMUP_MODELS = ("tv:resnet50", "tv:efficientnet_b0")  # the warm-up goal's two models, at the large side
PACE_MODEL = "tv:resnet50"  # the CUDA-graph goal's model, at the small side
HOURS_GOAL, USEFUL_GOAL, WARMUP_GOAL_S = 2.0, 0.75, 3.0


def slice_cells(sizes: Sizes) -> tuple[list[dict], list[dict]]:
    """(large-side cells with their twins, small-side cells) from suites/cifar_full.yaml's models and resolutions."""
    from bench.suite import load_suite
    from bench.validate import resolve_cells

    wanted = sizes.slice.get("models")
    sides: dict[str, list[int]] = {}
    for cell in resolve_cells(load_suite(CHECKOUT / "suites" / "cifar_full.yaml")):
        if wanted is None or cell.model.split(":", 1)[-1] in wanted:
            sides.setdefault(cell.model, []).append(cell.resolution)
    cap = sizes.slice.get("large_max") or math.inf
    large, small = [], []
    for model, sides_of in sides.items():
        low, high = min(sides_of), min(max(sides_of), cap)
        large.append({"model": model, "resolution": high})
        if low < high:
            small.append({"model": model, "resolution": low})
    large += [{"model": m, "resolution": r["resolution"], "cudnn_benchmark": True} for r in large
              for m in [r["model"]] if m in WARMUP_MODELS]
    large += [{**s, "cuda_graphs": "off"} for s in small if s["model"] == PACE_MODEL]
    return large, small


def suite_of(name: str, cells: list[dict], sizes: Sizes, dataset: str) -> dict:
    return {"name": name, "description": "issue 23: a slice of cifar_full", "dataset": dataset,
            "defaults": {**sizes.slice["defaults"], "cudnn_benchmark": "auto", "cuda_graphs": "auto"},
            "include": cells}


def step_suite(ctx: Context) -> Outcome:
    large, small = slice_cells(ctx.sizes)
    dataset = f"imagefolder:{ctx.cifar}" if ctx.cifar else "synthetic"
    runs, rows, problems = {}, {}, []
    plan = [("large", large, (), True), ("small", small, (), False),
            ("packed", small, ("--cells-per-gpu", ctx.sizes.slice["packing"]), False)]
    for label, cells, extra, profile in plan:
        if profile:
            ctx.env["BENCH_PROFILE_WARMUP"] = "1"
        started = time.monotonic()
        try:
            proc, got = ctx.bench_run(label, suite_of(f"gpu_check_suite_{label}", cells, ctx.sizes, dataset), extra)
        finally:
            ctx.env.pop("BENCH_PROFILE_WARMUP", None)
        runs[label], rows[label] = time.monotonic() - started, got
        problems += [f"{label}: {r['model']} {r['resolution']} px: {r['status']} ({as_text(r.get('error'))[:80]})"
                     for r in got if r["status"] != "ok"]
        problems += [f"{label}: {len(got)} of {len(cells)} cells recorded"] if len(got) < len(cells) else []
        problems += [f"{label}: {p}" for p in exit_problem(proc)]
    found = extrapolation(ctx)
    figures = suite_figures(rows, runs, found, ctx.sizes.device == "cuda")
    body = suite_body(figures, rows, ctx.results)
    if found is None:
        problems.append("the extrapolation did not run (logs/suite-extrapolate.log)")
    status = "ok" if not problems else "timeout" if ctx.left() < 2 else "failed"
    note = "; ".join(problems[:4]) or (f"{sum(len(r) for r in rows.values())} cells ok; packing x"
                                       f"{fmt(figures['packing_speedup'])}; cifar_full "
                                       f"{fmt(figures['hours_packed'])} h")
    goals = figures.pop("goals")
    return Outcome(status, note, body, figures, goals)


def extrapolation(ctx: Context) -> dict | None:
    out = ctx.out / "raw" / "extrapolate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [ctx.python, "-m", "benchmarks.gpu_check.extrapolate", "--results", str(ctx.results), "--json", str(out)]
    if ctx.sizes.slice.get("extrapolate_models"):  # the rehearsal: a few models, so the CPU counts few FLOPs
        argv += ["--models", ",".join(ctx.sizes.slice["extrapolate_models"])]
    ctx.run("extrapolate", argv)
    return json.loads(out.read_text()) if out.is_file() else None


def asked(row: dict, field: str):
    """What the cell asked for (its own JSON), where the row's column holds the value used: auto is None for
    cudnn_benchmark."""
    return json.loads(as_text(row.get("cell_json")) or "{}").get(field)


def suite_figures(rows: dict[str, list[dict]], runs: dict[str, float], found: dict | None, gpu: bool) -> dict:
    """The step's figures and goals from the three runs' rows and the extrapolation."""
    large, small = rows.get("large", []), rows.get("small", [])
    graphed = next((r for r in small if r["model"] == PACE_MODEL), None)
    eager = next((r for r in large if r["model"] == PACE_MODEL and asked(r, "cuda_graphs") == "off"), None)
    rate, eager_rate = num((graphed or {}).get("images_per_s")), num((eager or {}).get("images_per_s"))
    shape = f"{graphed['resolution']} px, batch {graphed['batch_size']}, {graphed.get('precision')}" if graphed else "?"
    goals = [goal(f"CUDA graphs: {PACE_MODEL}, {shape} (images/s)",
                  f">= {3 * BASELINE_32PX:,.0f} (3 x {BASELINE_32PX:,.0f})",
                  f"{fmt(rate)} (eager here: {fmt(eager_rate)})", rate >= 3 * BASELINE_32PX if gpu and rate else None)]
    goals.append(top1_goal(graphed, eager, gpu))
    warm = warmup_rows(large)
    for w in warm:
        if w["cudnn_benchmark"] == "auto":
            goals.append(goal(f"warm-up of {w['model']} at {w['resolution']} px (cudnn_benchmark auto)",
                              f"<= {WARMUP_GOAL_S:.0f} s", w["warmup_s"],
                              w["warmup_s"] <= WARMUP_GOAL_S if gpu and w["warmup_s"] is not None else None))
    speedup = runs["small"] / runs["packed"] if runs.get("packed") and runs.get("small") else None
    packed_most = max((num(r.get("concurrent_cells")) or 1 for r in rows.get("packed", [])), default=None)
    goals.append(goal("packing the small-side cells (--cells-per-gpu auto) over CUDA graphs alone: wall-time speedup",
                      "> 1", f"{fmt(speedup)} (up to {fmt(packed_most)} cells at once)",
                      speedup > 1 if gpu and speedup else None))
    slice_rows = [r for r in large + small if r["status"] == "ok"]
    spent = sum((num(r.get("train_s")) or 0) + (num(r.get("eval_s")) or 0) for r in slice_rows)
    walls = sum(num(r.get("wall_s")) or 0 for r in slice_rows)
    hours = hours_packed = useful = None
    if found and found["total_s"]:
        hours = found["total_s"] / 3600
        small_s = sum(v for k, v in found["by_resolution_s"].items() if int(k) <= 32)
        hours_packed = (found["total_s"] - small_s * (1 - 1 / speedup)) / 3600 if speedup else hours
        useful = 1 - found["cells"] * found["setup_s"] / found["total_s"]
    goals.append(goal("cifar_full on this GPU, extrapolated (small-side cells packed)", f"<= {HOURS_GOAL:.0f} h",
                      f"{fmt(hours_packed)} h (one at a time: {fmt(hours)} h)",
                      hours_packed <= HOURS_GOAL if gpu and hours_packed else None))
    goals.append(goal("cifar_full's share of wall time training and evaluating, extrapolated", f">= {USEFUL_GOAL}",
                      f"{fmt(useful)} (this slice, measured: {fmt(spent / walls if walls else None)})",
                      useful >= USEFUL_GOAL if gpu and useful is not None else None))
    return {"runs_s": runs, "graphs_images_per_s": rate, "eager_images_per_s": eager_rate, "warmup": warm,
            "packing_speedup": speedup, "packed_most": packed_most,
            "slice_useful_share": spent / walls if walls else None, "hours": hours, "hours_packed": hours_packed,
            "useful_share": useful, "extrapolation": found, "goals": goals}


def top1_goal(graphed: dict | None, eager: dict | None, gpu: bool) -> dict:
    """Test top-1 with CUDA graphs against the eager twin: within 3 standard errors of a difference of two
    proportions on the same test images (conservative: the pairing only narrows it)."""
    a, b = num((graphed or {}).get("top1")), num((eager or {}).get("top1"))
    n = num((graphed or {}).get("test_images"))
    if a is None or b is None or not n:
        return goal("CUDA graphs: the same test top-1 as eager, within noise", "|difference| <= 3 SE", "not measured",
                    None)
    se = math.sqrt(max(a * (1 - a) + b * (1 - b), 1e-12) / n)
    return goal("CUDA graphs: the same test top-1 as eager, within noise", "|difference| <= 3 SE",
                f"{a:.3f} vs {b:.3f} (SE {se:.3f}, {int(n)} images)", abs(a - b) <= 3 * se if gpu else None)


def warmup_rows(large: list[dict]) -> list[dict]:
    """ResNet-50 and EfficientNet-B0 at the large side, autotuning as auto resolved it and forced on: warm-up,
    steady images/s, and the steps after which autotuning would have repaid its warm-up."""
    out = []
    for model in WARMUP_MODELS:
        pair = [r for r in large if r["model"] == model and asked(r, "cuda_graphs") != "off"]
        auto = next((r for r in pair if asked(r, "cudnn_benchmark") is None), None)
        forced = next((r for r in pair if asked(r, "cudnn_benchmark") is True), None)
        for r, label in ((auto, "auto"), (forced, "true")):
            if r is not None:
                out.append({"model": model, "resolution": r["resolution"], "cudnn_benchmark": label,
                            "used": r.get("cudnn_benchmark"), "warmup_s": num(r.get("warmup_s")),
                            "images_per_s": num(r.get("images_per_s")), "batch_size": r["batch_size"]})
    for w in out:
        twin = next((o for o in out if o["model"] == w["model"] and o is not w), None)
        w["repaid_after_steps"] = _break_even(w, twin) if w["cudnn_benchmark"] == "true" else None
    return out


def _break_even(on: dict, off: dict | None) -> float | None:
    """Steps after which autotuning's extra warm-up is repaid by its faster steps (None: never, or not measured)."""
    if off is None or None in (on["warmup_s"], off["warmup_s"], on["images_per_s"], off["images_per_s"]):
        return None
    saved = on["batch_size"] / off["images_per_s"] - on["batch_size"] / on["images_per_s"]
    return max(0.0, on["warmup_s"] - off["warmup_s"]) / saved if saved > 0 else None


def suite_body(figures: dict, rows: dict[str, list[dict]], results: Path) -> str:
    parts = []
    for label in ("large", "small", "packed"):
        shown = [{"model": r["model"], "resolution": r["resolution"], "status": r["status"],
                  "cuda_graphs": r.get("cuda_graphs"), "cudnn_benchmark": r.get("cudnn_benchmark"),
                  "concurrent_cells": r.get("concurrent_cells"), "warmup_s": num(r.get("warmup_s")),
                  "images_per_s": num(r.get("images_per_s")), "train_s": num(r.get("train_s")),
                  "eval_s": num(r.get("eval_s")), "wall_s": num(r.get("wall_s")), "top1": num(r.get("top1"))}
                 for r in rows.get(label, [])]
        took = figures["runs_s"].get(label)
        parts.append(f"### `{label}` ({fmt(took)} s of `bench run`)\n\n" + (md(shown) if shown else "no rows"))
    if figures["warmup"]:
        parts.append("### cuDNN autotuning at the large side: auto against forced on\n\n" + md(figures["warmup"]))
    parts.append("### Warm-up profiles (BENCH_PROFILE_WARMUP=1; first steps of each large-side cell)\n\n"
                 + profiles(rows.get("large", []), results))
    found = figures["extrapolation"]
    if found:
        parts.append(f"### cifar_full extrapolated ({found['cells']} cells, {found['target']})\n\n"
                     f"{fmt(figures['hours'])} h one cell at a time, {fmt(figures['hours_packed'])} h with the "
                     f"small-side cells packed (x{fmt(figures['packing_speedup'])}); fixed cost per cell "
                     f"{fmt(found['setup_s'])} s; {found['calibration']}; seconds by resolution: "
                     + ", ".join(f"{k} px {v / 3600:.2f} h" for k, v in found["by_resolution_s"].items()))
    return "\n\n".join(parts)


def profiles(large: list[dict], results: Path) -> str:
    """The warm-up profile's summary lines from the logs of the warm-up models' cells."""
    out = []
    for r in large:
        if r["model"] not in WARMUP_MODELS or asked(r, "cuda_graphs") == "off":
            continue
        logs = sorted((results / r["suite"] / "logs").glob(f"{r['cell_id']}--{r['run_id']}.log"))
        text = logs[0].read_text(errors="replace") if logs else ""
        start = text.find("warm-up profile")
        if start < 0:
            continue
        block = text[start:].split("top operators by self CPU time:")[0]
        out.append(f"```\n{tail(block, 40)}\n```")
    return "\n\n".join(out) or "no profile found in the cells' logs"
