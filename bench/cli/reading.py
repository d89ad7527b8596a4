"""`bench report`, `results`, `compact`, `race replay`, `predict`, `env`, `fetch`: what is recorded, read back."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from bench.cli.app import friendly, main
from bench.errors import BenchError


@main.command()
@click.option("--results", type=click.Path(path_type=Path), default=Path("results"), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports"), show_default=True)
@click.option("--run", "run_id", help="Report this run id only.")
@click.option("--suite", help="Report this suite only.")
@click.option("--compare", help="Compare with this one run id (default: the suite's earlier runs, judged as a history "
                                "when there are at least five, else the previous run).")
@click.option("--fail-on-regression", is_flag=True, help="Exit 1 when a regression is flagged (for CI).")
@click.option("--within", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Accuracy points (validation) a cheaper, faster or smaller pick may lose against the best.")
@click.option("--max-vram", metavar="SIZE", help="Recommend only configs whose training VRAM fits, e.g. 8GiB, 512MiB.")
@click.option("--max-latency-ms", type=click.FloatRange(min=0, min_open=True),
              help="Recommend only configs this fast at batch 1 (median latency, ms).")
@click.option("--max-train-hours", type=click.FloatRange(min=0, min_open=True),
              help="Recommend only configs that train within this many GPU-hours (CPU-hours on a CPU).")
@friendly
def report(results, out, run_id, suite, compare, fail_on_regression, within, max_vram, max_latency_ms, max_train_hours):
    """Build reports/leaderboard.md and reports/leaderboard.html from the results folder."""
    from bench.report import build_report
    from bench.report.recommend import Budget, parse_size

    budget = Budget(within_pts=within, max_vram_bytes=parse_size(max_vram) if max_vram else None,
                    max_latency_ms=max_latency_ms, max_train_hours=max_train_hours)
    outcome = build_report(results, out, run=run_id, suite=suite, compare=compare, budget=budget)
    for problem in outcome.problems:
        click.echo(f"warning: {problem}", err=True)
    click.echo(f"wrote {outcome.markdown} and {outcome.html} ({outcome.rows} cells, {len(outcome.pngs)} plots)")
    for line in outcome.comparison:  # how many configs were compared, and by which rule (the nightly summary's line)
        click.echo(f"comparison: {line}")
    for line in outcome.regressions:
        click.echo(f"regression: {line}")
    if fail_on_regression and outcome.regressions:
        sys.exit(1)


@main.command()
@click.option("--results", type=click.Path(path_type=Path), default=Path("results"), show_default=True)
@click.option("--suite", help="This suite only.")
@click.option("--run", "run_id", help="This run id only.")
@click.option("--format", "form", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True,
              help="table: runs and cells; csv or json: the leaderboard's numbers (raw: fractions, seconds, bytes).")
@click.option("--out", type=click.Path(path_type=Path), help="Write to this file instead of the terminal.")
@friendly
def results(results, suite, run_id, form, out):
    """List the runs and cells of a results folder, or export the leaderboard as CSV or JSON."""
    from bench.report import export
    from bench.report.build import load

    loaded = load(results, run=run_id, suite=suite)
    for problem in loaded.problems:
        click.echo(f"warning: {problem}", err=True)
    if form == "table":
        runs = export.runs_frame(loaded.cells, run=run_id, suite=suite)
        text = export.table_text(runs, export.cells_frame(loaded.data))
    else:
        board = export.leaderboard_frame(loaded.data)
        text = export.to_csv(board) if form == "csv" else export.to_json(board)
    if out:
        out.write_text(text, encoding="utf-8")
        click.echo(f"wrote {out}", err=True)
    else:
        click.echo(text, nl=False)


@main.command()
@click.option("--results", type=click.Path(path_type=Path), default=Path("results"), show_default=True)
@friendly
def compact(results):
    """Fold each finished run's cell files into one file per run, so a long history reads fast; keeps every row."""
    from bench.store import ResultStore

    done = ResultStore(results).compact()
    for problem in done.problems:
        click.echo(f"warning: {problem}", err=True)
    click.echo(f"compacted {done.runs} runs ({done.files} files folded) in {results}/")


@main.group(short_help="Judge the race (a suite's `race:`) on grids already run.")
def race():
    """Judge the race (successive halving, a suite's `race:`) on grids already run, without training anything."""


def _rungs(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        rungs = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        rungs = []
    if not rungs or min(rungs) < 1:
        raise BenchError(f"--rungs {text!r} is not a list of epochs like 1,3 (whole numbers, 1 or more)")
    return rungs


@race.command(short_help="Simulate a race on a finished grid: its pick and device-hours against the grid's.")
@click.option("--results", type=click.Path(path_type=Path), default=Path("results"), show_default=True)
@click.option("--suite", help="Replay this suite's run (default: the newest full grid in the folder).")
@click.option("--run", "run_id", help="Replay this run id (default: the suite's newest run that was not a race).")
@click.option("--eta", type=click.IntRange(min=2), default=3, show_default=True,
              help="Keep the best 1/eta of the configs at each rung.")
@click.option("--rungs", metavar="1,3", help="Epochs at which configs are compared (default: 1, eta, eta^2 ... below "
                                             "the cells' epochs).")
@click.option("--margin", type=click.FloatRange(min=0, max=1, max_open=True), default=0.01, show_default=True,
              help="Validation top-1 (fraction) within which a one-seed config survives the cut-line.")
@friendly
def replay(results, suite, run_id, eta, rungs, margin):
    """Simulate a race on a finished full run from its epoch rows: the config it picks and the device-hours it
    spends, against the grid's own pick and hours."""
    from bench import replay as replays
    from bench.store import ResultStore
    from bench.suite import RaceSpec

    spec = RaceSpec(eta=eta, rungs=_rungs(rungs), margin=margin)
    store = ResultStore(results)
    found = store.read(columns=["finished_at"], epochs=False)  # every run: an unknown name lists the known ones
    suite, run_id = replays.choose_run(found.cells, str(results), run=run_id, suite=suite)
    read = store.read(suites=[suite], runs=[run_id], columns=replays.COLUMNS)
    for problem in read.problems:
        click.echo(f"warning: {problem}", err=True)
    done = replays.replay(read.cells, read.epochs, spec)
    click.echo(done.table())
    click.echo(done.summary())


@main.command()
@click.argument("model_file", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top", type=click.IntRange(min=1), default=3, show_default=True, help="Classes shown per image.")
@friendly
def predict(model_file, images, top):
    """Classify IMAGES with a model a cell saved (save_model: best | all), e.g. results/SUITE/models/best.safetensors."""
    from bench.saved import predict as classify

    for found in classify(model_file, list(images), top=top):
        guesses = ", ".join(f"{name} {100 * p:.1f}%" for name, p in found.top)
        click.echo(f"{found.path}: {guesses}")


@main.command()
def env():
    """Print the environment every result row records."""
    import torch

    from bench.measure import environment

    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    for key, value in environment(device).items():
        click.echo(f"{key:20} {value}")


@main.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--data-root", type=click.Path(path_type=Path), envvar="BENCH_DATA")
@friendly
def fetch(names, data_root):
    """Download weights (tv:resnet50, timm:...) or datasets (cifar10, cifar100, cinic10, hf:OWNER/NAME) for
    offline use."""
    from bench import data, models

    for name in names:
        if name.partition(":")[0] in data.DATASETS:
            click.echo(f"{name}: {data.fetch(name, data_root)}")
        else:
            for model in models.resolve(name):
                click.echo(f"{model}: {models.fetch_weights(model)}")
