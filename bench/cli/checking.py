"""`bench validate`, `bench models`, `bench schema`: what a suite would do, before anything runs."""

from __future__ import annotations

from pathlib import Path

import click

from bench.cli.app import SET_HELP, _load, friendly, main


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
