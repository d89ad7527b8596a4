"""The `bench` command: run, report, results, validate, models, race, predict, env, schema, fetch. Parsing and
printing only."""

from __future__ import annotations

import functools
import sys
from importlib import resources
from pathlib import Path

import click

from bench.errors import BenchError

SMOKE = "smoke"  # the embedded default suite, shipped inside the package


def _suite_path(suite: str | None) -> Path:
    if suite is None or suite == SMOKE:
        return Path(str(resources.files("bench") / "suites" / "smoke.yaml"))
    return Path(suite)


def friendly(fn):
    """Turn a BenchError into one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BenchError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bench")
def main() -> None:
    """Compare pretrained image backbones for transfer learning."""


def _load(suite: str | None, overrides: tuple[str, ...] = ()):
    from bench.suite import apply_overrides, load_suite
    from bench.validate import resolve_cells

    loaded = load_suite(_suite_path(suite))
    if overrides:
        loaded = apply_overrides(loaded, overrides)
    return loaded, resolve_cells(loaded)


SET_HELP = "KEY=VALUE for every cell, over the suite file (repeatable), e.g. --set epochs=1 --set batch_size=16."


def _default_devices(device: str | None, gpus: str | None) -> tuple[str, ...]:
    import torch

    count = torch.cuda.device_count()
    if gpus:
        if count == 0:
            raise BenchError("--gpus needs CUDA devices and this machine has none; drop --gpus to run on the CPU")
        try:
            ids = list(range(count)) if gpus == "all" else [int(g) for g in gpus.split(",")]
        except ValueError:
            raise BenchError(f"--gpus {gpus!r} is not 'all' or a list of indices like 0,1") from None
        if len(set(ids)) < len(ids):
            raise BenchError(f"--gpus {gpus} names a GPU twice; two cells on one GPU would spoil both cells' timings")
        bad = [i for i in ids if not 0 <= i < count]
        if bad:
            raise BenchError(f"--gpus names GPU {bad[0]} and this machine has {count} (0..{count - 1}); fix the list")
        return tuple(f"cuda:{i}" for i in ids)
    if not device:
        return ("cuda:0",) if count else ("cpu",)
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise BenchError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not 0 <= (parsed.index or 0) < count:
        raise BenchError(f"--device {device} is not on this machine ({count} CUDA devices); use --device cpu or a valid index")
    return (f"cuda:{parsed.index or 0}" if parsed.type == "cuda" else str(parsed),)


@main.command()
@click.argument("suite", required=False)
@click.option("--results", type=click.Path(path_type=Path), default=Path("results"), show_default=True)
@click.option("--data-root", type=click.Path(path_type=Path), envvar="BENCH_DATA", help="Where datasets live (or BENCH_DATA).")
@click.option("--device", help="cpu, cuda or cuda:N (default: cuda:0 when there is one).")
@click.option("--gpus", help="'all' or a list like 0,1: one cell per GPU at once.")
@click.option("--rerun", is_flag=True, help="Run cells again even when they have a row (old rows are kept).")
@click.option("--retry-failed", is_flag=True,
              help="Run only the cells whose newest row is oom, killed, timeout, error or unavailable.")
@click.option("--only", help="Run only cells whose id or model matches this glob, or FIELD=VALUE.")
@click.option("--max-cells", type=click.IntRange(min=1), help="Run at most N cells this time.")
@click.option("--cell-timeout", type=click.FloatRange(min=0, min_open=True), help="Seconds after which a cell is stopped (status timeout).")
@click.option("--max-host-mem", type=click.FloatRange(min=0, min_open=True), help="GiB of host RAM (PSS) a cell's processes may use (status oom past it).")
@click.option("--no-download", is_flag=True, help="Never try to download datasets.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--ray", "ray_address", metavar="ADDRESS",
              help="Run cells as Ray tasks, one GPU each: 'auto' (this machine's cluster), ray://HOST:PORT, or 'local'.")
@click.option("--slurm", "partition", metavar="PARTITION",
              help="Run cells as SLURM jobs (submitit), one GPU each, on PARTITION ('local': submitit's local executor).")
@click.option("--executor", type=click.Choice(["local", "ray", "slurm"]),
              help="Where cells run; ray means --ray auto, slurm the cluster's default partition (default: local).")
@click.option("--race", is_flag=True,
              help="Race the configs: all train to a first rung, the best third go on, and so on (the suite's race: "
                   "settings, or eta 3 and rungs 1, 3, 9 ... epochs).")
@click.option("--cells-per-gpu", metavar="N|auto",
              help="Cells side by side on each device (default 1): N, or auto: as many as fit by the VRAM earlier rows "
                   "of the same model needed (one where none did). Never a throughput cell; rows say concurrent_cells.")
@click.option("--exclusive", is_flag=True,
              help="One cell at a time on the whole machine, whatever the devices, so no row shares the host.")
@click.option("--mlflow", "mlflow_uri", metavar="URI", envvar="BENCH_MLFLOW",
              help="Also log each finished cell as an MLflow run at this tracking URI, e.g. sqlite:///mlflow.db or "
                   "http://HOST:5000 (or BENCH_MLFLOW; needs bench[mlflow]).")
@friendly
def run(suite, results, data_root, device, gpus, rerun, retry_failed, only, max_cells, cell_timeout, max_host_mem,
        no_download, overrides, ray_address, partition, executor, race, mlflow_uri, cells_per_gpu, exclusive):
    """Run every cell of SUITE (default: the embedded smoke suite) that has no result yet."""
    from bench.executors.local import packed
    from bench.progress import Progress
    from bench.runner import RunOptions, only_cells, run_suite
    from bench.suite import RaceSpec
    from bench.tracking import MlflowTracker

    if rerun and retry_failed:
        raise BenchError("--rerun runs every cell again and --retry-failed only the failed ones; pass one of them")
    ray_address, partition = _placement(executor, ray_address, partition)
    if (ray_address is not None or partition is not None) and (device or gpus):
        raise BenchError("--ray and --slurm give each cell a GPU of the cluster itself; drop --device and --gpus")
    loaded, cells = _load(suite, overrides)
    tracker = MlflowTracker(mlflow_uri) if mlflow_uri else None  # MLflow missing: an error before any cell runs
    # On a cluster the cluster places cells; the driver's own device only labels rows it writes itself.
    remote = ray_address is not None or partition is not None
    devices = ("cpu",) if remote else _default_devices(device, gpus)
    options = RunOptions(results=results, data_root=data_root, devices=devices, ray=ray_address, slurm=partition,
                         rerun=rerun, retry_failed=retry_failed, only=only, max_cells=max_cells,
                         cell_timeout_s=cell_timeout,
                         max_host_bytes=int(max_host_mem * 2**30) if max_host_mem else None,
                         download=not no_download, race=(loaded.race or RaceSpec()) if race else None,
                         tracker=tracker)
    where = (f"Ray ({ray_address})" if ray_address is not None else f"SLURM ({partition or 'default partition'})"
             if partition is not None else ", ".join(options.devices))
    matching = f", {len(only_cells(cells, only))} matching --only {only}" if only else ""
    click.echo(f"suite {loaded.name}: {len(cells)} cells{matching} on {where}; results in {results}/")
    with packed(cells_per_gpu, exclusive, remote), Progress(cells=cells) as progress:
        summary = run_suite(loaded, cells, options, progress.handle)
    left_out = "ok or never run" if retry_failed else "already done"
    click.echo(f"run {summary.run_id}: {len(summary.rows)} cells run, {summary.skipped} {left_out}")
    if summary.rows:
        click.echo(summary_table(summary.rows))
    dropped = [r for r in summary.rows if r["status"] == "dropped"]
    if dropped:
        click.echo(f"{len(dropped)} cell(s) dropped by the race: not failures; their rows say at which rung and why.")
    failed = [r for r in summary.rows if r["status"] not in ("ok", "dropped")]
    if failed:
        click.echo(f"{len(failed)} cell(s) did not finish ok; their rows say why (bench report lists them).")


def _placement(executor: str | None, ray_address: str | None, partition: str | None) -> tuple[str | None, str | None]:
    """--executor, --ray and --slurm as one choice: (Ray address, SLURM partition), at most one of them set."""
    if ray_address is not None and partition is not None:
        raise BenchError("--ray and --slurm both choose where cells run; pass one of them")
    chosen = "ray" if ray_address is not None else "slurm" if partition is not None else None
    if executor and chosen and executor != chosen:
        raise BenchError(f"--executor {executor} contradicts --{chosen}; drop one of them")
    if executor == "ray" and ray_address is None:
        ray_address = "auto"
    if executor == "slurm" and partition is None:
        partition = ""
    return ray_address, partition


def summary_table(rows: list[dict]) -> str:
    import pandas as pd

    frame = pd.DataFrame(rows)
    cols = {"cell_id": "cell", "model": "model", "resolution": "res", "batch_size": "bs", "freeze": "freeze",
            "seed": "seed", "status": "status", "top1": "top1", "train_s": "train_s", "images_per_s": "img/s",
            "peak_host_pss_bytes": "host_MiB", "peak_vram_allocated_bytes": "vram_MiB"}
    frame = frame.reindex(columns=list(cols)).rename(columns=cols)
    for col in ("host_MiB", "vram_MiB"):
        frame[col] = (frame[col].astype("float64") / 2**20).round(0)
    return frame.to_string(index=False, float_format=lambda v: f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}")


@main.command()
@click.argument("suite", required=False)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--gpu", help="Estimate for this device class (h100, a100, l4, cpu ...) instead of this machine's.")
@click.option("--results", type=click.Path(path_type=Path), default=Path("results"), show_default=True,
              help="Earlier rows here calibrate the estimate.")
@click.option("--estimate/--no-estimate", default=True, show_default=True, help="Estimate run time and memory risk.")
@click.option("--race", is_flag=True, help="Also print the race's plan (the suite's race: settings, or the defaults).")
@friendly
def validate(suite, overrides, gpu, results, estimate, race):
    """Check SUITE, print its expanded cells and what they will cost; runs nothing."""
    import pandas as pd

    from bench import models
    from bench import validate as checks

    loaded, cells = _load(suite, overrides)
    frame = pd.DataFrame([{"id": c.id, **c.model_dump(exclude={"suite", "dataset"})} for c in cells])
    varying = ["id"] + [c for c in frame.columns if c != "id" and frame[c].astype(str).nunique() > 1]
    shown = varying if len(varying) > 1 else ["id", "model", "resolution", "batch_size", "freeze"]
    cost = checks.estimate(cells, results=results, target=checks.target_device(gpu)) if estimate else None
    if cost:
        frame["est"] = [_duration(c.seconds) for c in cost.cells]
        frame["basis"] = [c.basis for c in cost.cells]
        frame["memory_risk"] = [c.memory_risk for c in cost.cells]
        shown += ["est", "basis"] + (["memory_risk"] if frame["memory_risk"].ne("").any() else [])
    click.echo(frame[shown].to_string(index=False))
    click.echo("input recipes (from each model's weights; random-init cells use their architecture's default):")
    for cell in {(c.model, c.weights, c.input_mean, c.input_std): c for c in cells}.values():
        recipe = models.cell_recipe(cell)
        click.echo(f"  {cell.model}{' ' + cell.weights if cell.weights else ''}: {recipe.describe()}  [{recipe.source}]")
    if cost:
        click.echo(_estimate_summary(cost))
    if race or loaded.race is not None:
        click.echo(_race_plan(cells, loaded.race, cost))
    click.echo(f"suite {loaded.name} ({loaded.source}): {len(cells)} cells, dataset {loaded.dataset}, ok")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _race_plan(cells, spec, cost) -> str:
    """The race's rungs, the configs alive at each, and its device time against the full grid's."""
    from bench import race
    from bench.suite import RaceSpec

    spec = spec or RaceSpec()
    seconds = [c.seconds for c in cost.cells] if cost else [float(c.epochs) for c in cells]
    planned = race.plan(cells, spec, seconds)
    if not planned.rungs:
        return "race: nothing to race (a race needs configs of two epochs or more, with validation, in train mode)"
    line = (f"race (eta {spec.eta}, rungs at {', '.join(map(str, planned.rungs))} epochs, margin "
            f"{100 * spec.margin:g} pts): configs {' -> '.join(map(str, planned.alive))}")
    if not cost:
        return line + f"; {100 * planned.race_s / planned.grid_s:.0f}% of the full grid's epochs"
    return (line + f"; about {_duration(planned.race_s)} of device time against the full grid's "
            f"{_duration(planned.grid_s)} ({100 * planned.race_s / planned.grid_s:.0f}%), if no config ties the cut-line")


def _estimate_summary(cost) -> str:
    from collections import Counter

    bases = Counter(c.basis.split(" (")[0].split(",")[0] for c in cost.cells)
    fit = cost.fit
    risky = [c for c in cost.cells if c.memory_risk]
    lines = [
        f"estimate on {cost.target.label}: {len(cost.cells)} cells, {_duration(cost.total_s)} in all "
        f"({', '.join(f'{n} {basis}' for basis, n in bases.items())})",
        f"  speed: {fit.step_s * 1000:.0f} ms per step or batch, {fit.flops_per_s / 1e9:,.0f} GFLOP/s of forward "
        f"FLOPs, {fit.setup_s:.0f} s setup per cell; calibrated by {cost.calibration}",
        "  rough: a cell's time is setup + steps x step time + FLOPs / rate; early stops (target_top1) are not foreseen",
        f"memory risk: {len(risky)} cells" if risky else
        "memory risk: none flagged (judged only from earlier rows of the same model on this device)",
    ]
    lines += [f"  {c.cell.id} {c.cell.model} {c.cell.resolution} px bs {c.cell.batch_size} freeze {c.cell.freeze_label}: "
              f"{c.memory_risk}" for c in risky]
    return "\n".join(lines)


@main.command()
@click.argument("pattern", required=False)
@friendly
def models(pattern):
    """List backbones (optionally matching a glob such as 'resnet*' or 'timm:xception*')."""
    from bench import models

    # timm lists over a thousand models: without a pattern, list torchvision's and say how to see timm's.
    names = models.resolve(pattern) if pattern else models.list_models("tv:*")
    click.echo(f"{'name':32} {'source':11} {'params_M':>8} {'default_weights':22} {'native':>6} {'min':>5}")
    for name in names:
        i = models.info(name)
        fixed = "*" if i.fixed_resolution else ""
        click.echo(f"{i.name:32} {i.source:11} {i.params_m:8.1f} {str(i.default_weights):22} "
                   f"{i.native_resolution:6d} {i.min_resolution:4d}{fixed}")
    click.echo(f"{len(names)} models; * = only its native resolution")
    if not pattern:
        click.echo("timm's models (pip install 'bench[timm]'): bench models 'timm:PATTERN', e.g. 'timm:xception*'")


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
@click.option("--out", type=click.Path(path_type=Path), help="Write it to this file (suites/schema.json) instead.")
def schema(out):
    """Print the JSON Schema of suite files, for editors: suites name it on their first line with
    `# yaml-language-server: $schema=./schema.json`."""
    from bench.schema import schema_text

    if out is None:
        click.echo(schema_text(), nl=False)
    else:
        out.write_text(schema_text(), encoding="utf-8")
        click.echo(f"wrote {out}")


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


if __name__ == "__main__":
    main()
