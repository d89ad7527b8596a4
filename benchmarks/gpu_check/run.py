"""The GPU check's run: its steps in order, each inside its budget, and the summary rewritten before and after
every step; `main` is `python -m benchmarks.gpu_check`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.gpu_check.config import CHECKOUT, CPU, GPU
from benchmarks.gpu_check.plumbing import Context, Outcome, child_env, md
from benchmarks.gpu_check.steps_measure import (
    step_harness,
    step_loader,
    step_oom,
    step_real,
    step_throughput,
)
from benchmarks.gpu_check.steps_setup import step_env, step_pytest, step_setup
from benchmarks.gpu_check.steps_suite import step_suite
from benchmarks.gpu_check.steps_weights import step_realweights

# ---------------------------------------------------------------- the run and its summary


@dataclass(frozen=True)
class Step:
    key: str
    title: str
    run: Callable[[Context], Outcome]
    needs_bench: bool = True


STEPS = [
    Step("setup", "0. Setup: wheels, data, what is missing", step_setup, needs_bench=False),
    Step("env", "1. Environment", step_env, needs_bench=False),
    Step("pytest", "2. pytest -m gpu", step_pytest),
    Step("throughput", "3. Throughput (suites/throughput.yaml, 224 px, bf16, channels_last)", step_throughput),
    Step("harness", "4. Harness vs bare training loop", step_harness),
    Step("loader", "5. Device loader vs DataLoader", step_loader),
    Step("real", "6. Real data: CIFAR-10 JPEGs", step_real),
    Step("oom", "7. Out of memory, then the next cell", step_oom),
    Step("realweights", "8. Real ImageNet weights: EfficientNet-Lite fine-tuned on CIFAR-10", step_realweights),
    Step("suite", "9. A slice of cifar_full: CUDA graphs, cuDNN autotuning where it pays, packing", step_suite),
]


def run_step(ctx: Context, step: Step) -> Outcome:
    """One step inside its budget; whatever goes wrong becomes the step's recorded reason, never the run's end."""
    if ctx.stop:
        return Outcome("skipped", ctx.stop)
    if step.needs_bench and ctx.bench_ready:
        return Outcome("skipped", f"bench does not import ({ctx.bench_ready}); see step 0")
    ctx.step = step.key
    ctx.step_deadline = time.monotonic() + ctx.sizes.budgets_s[step.key]
    if ctx.left() < 5:
        return Outcome("skipped", "the run's time budget is spent")
    t0 = time.monotonic()
    try:
        outcome = step.run(ctx)
    except Exception as exc:  # noqa: BLE001 - a broken step is recorded with its reason; the next one runs
        outcome = Outcome("failed", f"{type(exc).__name__}: {exc}"[:300])
    outcome.seconds = time.monotonic() - t0
    return outcome


def write_summary(ctx: Context, outcomes: dict[str, Outcome], running: str | None = None) -> None:
    """summary.md (to paste into benchmarks/RESULTS.md) and summary.json, replaced atomically."""
    elapsed = (datetime.now(timezone.utc) - ctx.started).total_seconds()
    where = ctx.gpu.get("gpu") or ("CPU rehearsal" if ctx.sizes.device == "cpu" else "GPU not yet known")
    head = [f"# GPU check: {where}, {ctx.started:%Y-%m-%d}", "",
            f"- command: `{shlex.join(ctx.argv)}`",
            f"- mode: {'GPU run' if ctx.sizes.device == 'cuda' else 'CPU rehearsal (tiny sizes: not GPU figures)'}, "
            f"budget {ctx.sizes.total_s:.0f} s; started {ctx.started:%Y-%m-%d %H:%M:%S} UTC, {elapsed:.0f} s so far",
            f"- torch {ctx.gpu.get('torch', '?')}, CUDA {ctx.gpu.get('cuda', '?')}, cuDNN {ctx.gpu.get('cudnn', '?')}, "
            f"GPU memory {ctx.gpu.get('gpu_memory_gib', 'n/a')} GiB; commit {ctx.commit}", ""]
    rows = []
    for step in STEPS:
        o = outcomes.get(step.key)
        status = o.status if o else "running" if step.key == running else "not run"
        rows.append({"step": step.title.split(":")[0], "status": status, "seconds": round(o.seconds, 1) if o else "",
                     "budget_s": ctx.sizes.budgets_s[step.key], "note": (o.note if o else "").replace("|", "/")})
    goals = [g for o in outcomes.values() for g in o.goals]
    body = head + [md(rows), ""]
    if goals:
        body += ["## Goals", "", md(goals), ""]
    for step in STEPS:
        if step.key in outcomes and outcomes[step.key].body:
            body += [f"## {step.title}", "", outcomes[step.key].body, ""]
    atomic_write(ctx.out / "summary.md", "\n".join(body))
    data = {"mode": ctx.sizes.device, "started": ctx.started.isoformat(), "elapsed_s": elapsed, "running": running,
            "budget_s": ctx.sizes.total_s, "budgets_s": ctx.sizes.budgets_s, "gpu": ctx.gpu,
            "steps": {k: dataclasses.asdict(o) for k, o in outcomes.items()}}
    atomic_write(ctx.out / "summary.json", json.dumps(data, indent=1, default=str))


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                                     description=sys.modules[__package__].__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the rehearsal: the same steps with tiny sizes on the CPU")
    parser.add_argument("--out", type=Path, help="output folder (default: $OUT, else results/gpu_check/<time>)")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "bench-gpu-check-data",
                        help="where the CIFAR-10 JPEGs are unpacked and decoded (default: a temporary folder, so "
                             ".data/ keeps only the tarball that is copied to a GPU machine)")
    parser.add_argument("--steps", help="run only these steps (setup and env always run), e.g. throughput,real: for a "
                                        "second window; keys: " + ", ".join(s.key for s in STEPS))
    args = parser.parse_args(argv)
    chosen = set(args.steps.split(",")) if args.steps else {s.key for s in STEPS}
    unknown = chosen - {s.key for s in STEPS}
    if unknown:
        parser.error(f"--steps: unknown {', '.join(sorted(unknown))}; choose from {', '.join(s.key for s in STEPS)}")
    sizes = CPU if args.cpu else GPU
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    default = Path(os.environ["OUT"]) if os.environ.get("OUT") else CHECKOUT / "results" / "gpu_check" / stamp
    out = (args.out or default).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = ["python", "-m", "benchmarks.gpu_check", *(argv if argv is not None else sys.argv[1:])]
    ctx = Context(out=out, data=args.data.resolve(), sizes=sizes, argv=command, env=child_env(sizes),
                  deadline=time.monotonic() + sizes.total_s)
    signal.signal(signal.SIGTERM, _interrupt)  # a machine's time limit: the running command dies with us
    outcomes: dict[str, Outcome] = {}
    for step in STEPS:
        write_summary(ctx, outcomes, running=step.key)
        print(f"[{time.monotonic() - ctx.deadline + sizes.total_s:5.0f} s] {step.title} ...", flush=True)
        try:
            chosen_now = step.key in chosen | {"setup", "env"}
            outcome = run_step(ctx, step) if chosen_now else Outcome("skipped", "not in --steps")
        except KeyboardInterrupt:
            outcomes[step.key] = Outcome("failed", "interrupted (Ctrl-C or SIGTERM) while running")
            write_summary(ctx, outcomes)
            return 130
        outcomes[step.key] = outcome
        print(f"        {outcome.status} in {outcome.seconds:.0f} s: {outcome.note}", flush=True)
    write_summary(ctx, outcomes)
    print(f"\nsummary: {out / 'summary.md'}")
    return 0 if all(o.status in ("ok", "skipped") for o in outcomes.values()) else 1
