"""`bench run`: which devices, which engine, the run and its summary."""

from __future__ import annotations

from pathlib import Path

import click

from bench.cli.app import SET_HELP, _load, friendly, main
from bench.errors import BenchError


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
