"""Steps 3-7 of the GPU check: throughput beside published figures, harness vs bare loop, device loader vs
DataLoader, real CIFAR-10, a cell that runs out of memory and then one that must run."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.gpu_check.config import (
    CHECKOUT,
    GB,
    NVIDIA_A100_RESNET50_AMP,
    TARBALL,
    TIMM_RTX3090_AMP,
    TIMM_RTX3090_FILE,
    Sizes,
)
from benchmarks.gpu_check.plumbing import (
    Context,
    Outcome,
    Proc,
    as_text,
    brief,
    cells_status,
    exit_problem,
    fmt,
    gib,
    goal,
    host_bytes,
    last_line,
    md,
    num,
    read_rows,
    tail,
)

# ---------------------------------------------------------------- 3: throughput


def step_throughput(ctx: Context) -> Outcome:
    """suites/throughput.yaml narrowed to four backbones; a model that runs out of memory is tried at half
    the batch (the largest that fits), while the step has time."""
    pending, batch, rows, proc = list(ctx.sizes.throughput_models), ctx.sizes.throughput["batch_size"], [], None
    smallest, ooms = max(1, batch // 8), []
    while pending and batch >= smallest and ctx.left() > 10:
        proc, got = ctx.bench_run(f"bs{batch}", throughput_suite(ctx.sizes, pending, batch))
        rows += [r for r in got if r["status"] != "oom"]
        ooms = [r for r in got if r["status"] == "oom"]
        pending = [r["model"].split(":", 1)[-1] for r in ooms]
        batch //= 2
    rows += ooms  # out of memory down to the smallest batch tried: shown, not dropped
    table_rows = [throughput_row(r) for r in rows]
    body = md(table_rows) if table_rows else f"no rows\n\n```\n{tail(proc.text if proc else '', 15)}\n```"
    body += (f"\n\ntimm: `{TIMM_RTX3090_FILE}` (RTX 3090, AMP fp16, channels_last, PyTorch 1.12, its own batch size);"
             f" NVIDIA: DeepLearningExamples ResNet-50 v1.5, 1x A100 80GB, AMP, {NVIDIA_A100_RESNET50_AMP:.0f} img/s.")
    bad = [f"{r['model']}: {r['status']} ({as_text(r.get('error'))})" for r in rows if r["status"] != "ok"]
    bad += exit_problem(proc)
    status = cells_status(proc, rows, len(ctx.sizes.throughput_models), bad)
    rates = ", ".join(f"{r['model']} {r['images_per_s']:.0f}" for r in table_rows if r["images_per_s"])
    return Outcome(status, "; ".join(bad) or f"images/s: {rates}", body, {"rows": table_rows})


def throughput_suite(sizes: Sizes, models: list[str], batch: int) -> dict:
    """suites/throughput.yaml with its models narrowed and its batch (and the rehearsal's sizes) set."""
    import yaml

    base = yaml.safe_load((CHECKOUT / "suites" / "throughput.yaml").read_text())
    defaults = {**base["defaults"], **sizes.throughput, "batch_size": batch}
    return {**base, "name": f"gpu_check_throughput_bs{batch}", "defaults": defaults, "grid": {"model": list(models)}}


def throughput_row(r: dict) -> dict:
    ref = TIMM_RTX3090_AMP.get(r["model"])
    rate = num(r.get("images_per_s"))
    row = {"model": r["model"], "status": r["status"], "batch_size": r["batch_size"], "precision": r["precision"],
           "images_per_s": rate, "warmup_s": num(r.get("warmup_s")),
           "timm_3090_amp_img_s": f"{ref[1]:.0f} ({ref[0]}, bs {ref[2]})" if ref else None,
           "x_3090": rate / ref[1] if ref and rate else None}
    if r["model"] == "tv:resnet50":
        row["x_a100_2470"] = rate / NVIDIA_A100_RESNET50_AMP if rate else None
    return row


# ---------------------------------------------------------------- 4, 5: harness and loader benchmarks


def step_benchmark(ctx: Context, module: str, args: tuple[str, ...]) -> tuple[Proc, dict | None]:
    out = ctx.out / "raw" / f"{module}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = ctx.run(module, [ctx.python, "-m", f"benchmarks.{module}", *args, "--json", str(out)])
    return proc, json.loads(out.read_text()) if out.is_file() else None


def no_figures(proc: Proc) -> Outcome:
    return Outcome("timeout" if proc.timed_out else "failed", last_line(proc.text), f"```\n{tail(proc.text, 15)}\n```")


def step_harness(ctx: Context) -> Outcome:
    proc, found = step_benchmark(ctx, "harness_overhead", ctx.sizes.harness)
    if not found:
        return no_figures(proc)
    rows = found["rows"]
    goals = [goal(f"harness/bare, {r['model']} {r['resolution']} px bs {r['batch_size']} {r['precision']}",
                  ">= 0.95", r["ratio"], r["ratio"] >= 0.95) for r in rows]
    body = md(rows) + (f"\n\n{found['device']}, {found['timed_steps']} timed steps after {found['warmup_steps']}, "
                       f"{found['repeats']} interleaved pairs; ratio = median of pairs")
    return Outcome("ok", f"min ratio {min(r['ratio'] for r in rows):.3f}", body, found, goals)


def step_loader(ctx: Context) -> Outcome:
    proc, found = step_benchmark(ctx, "loader_throughput", ctx.sizes.loader)
    if not found:
        return no_figures(proc)
    rows = found["rows"]
    body = md(rows) + (f"\n\n{found['device']}, {found['source']}, {found['images']} images, batch "
                       f"{found['batch_size']}, DataLoader with {found['workers']} workers")
    note = ", ".join(f"{r['resolution']} px x{r['ratio']:.1f}" for r in rows)
    return Outcome("ok", f"device loader / DataLoader: {note}", body, found)


# ---------------------------------------------------------------- 6: real data


def step_real(ctx: Context) -> Outcome:
    if ctx.cifar is None:
        return Outcome("skipped", f"the CIFAR-10 JPEGs ({TARBALL}) are absent: copy it into .data/ or set BENCH_ASSETS")
    suite = real_suite(ctx.sizes, ctx.cifar)
    cells = suite["include"]
    since = datetime.now(timezone.utc)
    proc, rows = ctx.bench_run("cifar10", suite)
    if len(rows) < len(cells) or any(r["status"] != "ok" for r in rows):
        bad = [f"{r['model']} {r['resolution']} px: {r['status']} ({as_text(r.get('error'))})" for r in rows
               if r["status"] != "ok"]
        bad += [] if len(rows) == len(cells) else [f"{len(rows)} of {len(cells)} cells recorded"]
        bad += exit_problem(proc)
        status = "timeout" if proc.timed_out else "failed"
    else:
        bad, status = [], "ok"
    epochs = read_rows(ctx.results, suite["name"], since, epochs=True)
    references = infer_references(ctx, [r for r in rows if r["model"] == "tv:resnet50" and r["status"] == "ok"])
    sections, goals = real_sections(rows, epochs, ctx.rows, references)
    if not rows:
        sections += f"\n\n```\n{tail(proc.text, 15)}\n```"
    note = "; ".join(bad) or f"{len(rows)} cells ok"
    return Outcome(status, note, sections, {"rows": [brief(r) for r in rows]}, goals)


def real_suite(sizes: Sizes, folder: Path) -> dict:
    """The ResNet-18 sanity cell, then ResNet-50 at 224 and at 32 px, on the CIFAR-10 JPEGs in FOLDER."""
    r50 = sizes.resnet50
    cells = [dict(sizes.sanity), {**r50, "resolution": 224}, {**r50, "resolution": 32}]
    return {"name": "gpu_check_real", "description": "issue 16: real CIFAR-10 JPEGs",
            "dataset": f"imagefolder:{folder}", "defaults": {"pretrained": False}, "include": cells}


def real_sections(rows: list[dict], epochs: list[dict], every: list[dict],
                  references: dict[str, dict] | None = None) -> tuple[str, list[dict]]:
    """The sanity run, the ResNet-50 pair and host RAM from this step's rows; VRAM from every ok row so far;
    inference VRAM of the ResNet-50 pair beside the same models never trained (`references`, by cell id)."""
    goals, parts = [], []
    sanity = next((r for r in rows if r["model"] == "tv:resnet18"), None)
    if sanity:
        curve = [e for e in epochs if e["cell_id"] == sanity["cell_id"]]
        clock, reached = 0.0, None
        for e in curve:
            clock += num(e.get("epoch_s")) or 0.0
            if reached is None and (num(e.get("val_top1")) or 0) >= 0.80:
                reached = (int(e["epoch"]), clock)
        top1, train_s = num(sanity.get("top1")), num(sanity.get("train_s"))
        goals.append(goal("ResNet-18 from scratch, 32 px: test top-1 in under 60 s of training", ">= 0.80, < 60 s",
                          f"{fmt(top1)} in {fmt(train_s)} s", bool(top1 and train_s and top1 >= 0.80 and train_s < 60)))
        line = f"validation passed 0.80 after epoch {reached[0]}, {reached[1]:.1f} s of epochs" if reached else \
            "validation never reached 0.80"
        parts.append("### ResNet-18 from scratch at 32 px (sanity)\n\n" + md([brief(sanity)])
                     + f"\n\n{line}; per epoch val_top1: " + ", ".join(fmt(num(e.get('val_top1'))) for e in curve))
    pair = {r["resolution"]: r for r in rows if r["model"] == "tv:resnet50"}
    if pair:
        parts.append("### ResNet-50 at 224 and 32 px (every image of the folder loaded, 60,000 on a GPU run; "
                     "a few steps)\n\n" + md([brief(r) for r in pair.values()]))
    if 32 in pair and 224 in pair:
        low, high = host_bytes(pair[32]), host_bytes(pair[224])
        if low and high:
            goals.append(goal("peak host RAM, 224 px / 32 px (ResNet-50)", "<= 1.10", high / low, high / low <= 1.10))
            goals.append(goal("peak host RAM at 224 px", "< 2.5 GB", f"{high / GB:.2f} GB", high < 2.5 * GB))
    parts.append("### Peak VRAM of every ok cell so far: allocator allocated and reserved, NVML (whole device, and "
                 "the cell's process)\n\n" + vram_table([r for r in every if r["status"] == "ok"], goals))
    parts.append("### Inference VRAM of the trained ResNet-50 cells beside the same models never trained\n\n"
                 + infer_table(list(pair.values()), references or {}, goals))
    return "\n\n".join(parts), goals


# What a process holds on a GPU beyond the allocator's reserve: the CUDA context, cuDNN's and cuBLAS's kernels and
# handles. The H200 runs of 2026-11-27 had the whole device's NVML figure 1.3-1.4 GiB above the reserve, the driver's
# own device reservation included; a process figure outside this band is being read for the wrong process or device.
CONTEXT_GIB = (0.25, 1.5)
# A trained cell's inference peak may exceed a never-trained model's by allocator rounding, not by training's leftovers:
# ResNet-50's gradients alone are 94 MiB, with SGD's momentum 188 MiB.
INFER_SLACK_BYTES, INFER_SLACK_FRACTION = 32 * 2**20, 0.05


def process_verdict(row: dict) -> bool | None:
    """Whether the cell's process figure (NVML) is its allocator's reserve plus a CUDA context; None: not recorded."""
    reserved, process = num(row.get("peak_vram_reserved_bytes")), num(row.get("peak_vram_process_bytes"))
    if reserved is None or process is None:
        return None
    return CONTEXT_GIB[0] * 2**30 <= process - reserved <= CONTEXT_GIB[1] * 2**30


def vram_table(rows: list[dict], goals: list[dict]) -> str:
    out, verdicts = [], []
    for r in rows:  # NVML is sampled every 50 ms, but the reserve it sits on stays until the cell empties its cache
        a, res, n, proc = (num(r.get(f"peak_vram_{k}_bytes")) for k in ("allocated", "reserved", "nvml", "process"))
        verdict = process_verdict(r)
        verdicts.append(verdict)
        out.append({"suite": r["suite"], "model": r["model"], "resolution": r["resolution"],
                    "batch_size": r["batch_size"], "allocated_GiB": gib(a), "reserved_GiB": gib(res),
                    "nvml_device_GiB": gib(n), "process_GiB": gib(proc),
                    "context_GiB": gib(proc - res) if None not in (proc, res) else None,
                    "context_ok": "n/a" if verdict is None else verdict})
    known = [v for v in verdicts if v is not None]
    measured = f"{sum(known)} of {len(known)}" if known else "no per-process figure recorded"
    goals.append(goal(f"VRAM of the cell's process (NVML) = allocator reserve + {CONTEXT_GIB[0]}-{CONTEXT_GIB[1]} GiB "
                      "context, every cell", "all cells", measured, all(known) if known else None))
    return md(out) if out else "no rows"


def infer_verdict(row: dict, reference: dict | None) -> bool | None:
    """Whether a trained cell's inference peak is its model's weights plus one batch's activations: at least the
    weights, at most a never-trained model's peak and a little slack. None: either figure not recorded."""
    trained = num(row.get("infer_peak_vram_bytes"))
    fresh = num(reference.get("infer_peak_vram_bytes")) if reference else None
    if trained is None or fresh is None:
        return None
    weights = num(reference.get("weights_bytes")) or 0.0
    return weights <= trained <= fresh + max(INFER_SLACK_BYTES, INFER_SLACK_FRACTION * fresh)


def infer_table(rows: list[dict], references: dict[str, dict], goals: list[dict]) -> str:
    out, verdicts = [], []
    for r in rows:
        ref = references.get(r["cell_id"])
        verdict = infer_verdict(r, ref)
        verdicts.append(verdict)
        trained, fresh = num(r.get("infer_peak_vram_bytes")), num(ref.get("infer_peak_vram_bytes")) if ref else None
        extra = None if None in (trained, fresh) else round((trained - fresh) / 2**20, 1)
        out.append({"model": r["model"], "resolution": r["resolution"], "batch_size": r["batch_size"],
                    "weights_GiB": gib(num(ref.get("weights_bytes"))) if ref else None,
                    "never_trained_GiB": gib(fresh), "trained_GiB": gib(trained),
                    "trained_minus_never_MiB": extra,
                    "ok": "n/a" if verdict is None else verdict})
    known = [v for v in verdicts if v is not None]
    slack = f"max({INFER_SLACK_BYTES >> 20} MiB, {INFER_SLACK_FRACTION:.0%})"
    goals.append(goal(f"inference VRAM of a trained cell <= the model never trained + {slack}: no gradients or "
                      "optimizer state left", "all cells",
                      f"{sum(known)} of {len(known)}" if known else "not recorded", all(known) if known else None))
    return md(out) if out else "no rows"


def infer_references(ctx: Context, rows: list[dict]) -> dict[str, dict]:
    """`infer_reference` run on the models of ROWS in a fresh process: {cell id: weights and inference peak}."""
    if not rows:
        return {}
    given, out = ctx.out / "raw" / "infer_reference_rows.json", ctx.out / "raw" / "infer_reference.json"
    given.parent.mkdir(parents=True, exist_ok=True)
    keep = ("cell_id", "cell_json", "precision", "num_classes")
    given.write_text(json.dumps([{k: as_text(r.get(k)) if k != "num_classes" else num(r.get(k)) for k in keep}
                                 for r in rows]))
    ctx.run("infer-reference", [ctx.python, "-m", "benchmarks.gpu_check.infer_reference", "--rows", str(given),
                                "--json", str(out)])
    return {r["cell_id"]: r for r in json.loads(out.read_text())["rows"]} if out.is_file() else {}


# ---------------------------------------------------------------- 7: out of memory, then the next cell


def step_oom(ctx: Context) -> Outcome:
    limit = ctx.sizes.max_host_mem_gib
    proc, rows = ctx.bench_run("oom", oom_suite(ctx.sizes), ("--max-host-mem", str(limit)) if limit else ())
    how = (f"CPU rehearsal: no GPU to exhaust, so the runner's host-RAM limit (--max-host-mem {limit} GiB) makes the "
           f"oom row" if limit else "GPU memory exhausted by the first cell")
    table_rows = [{**brief(r), "error": as_text(r.get("error"))[:120]} for r in rows]
    body = (md(table_rows) if table_rows else f"no rows\n\n```\n{tail(proc.text, 15)}\n```") + f"\n\n{how}."
    statuses = [r["status"] for r in rows]
    status = "ok" if statuses == ["oom", "ok"] else ("timeout" if proc.timed_out else "failed")
    note = "; ".join([f"statuses in run order: {statuses}", how, *exit_problem(proc)])
    return Outcome(status, note, body, {"rows": table_rows, "statuses": statuses})


def oom_suite(sizes: Sizes) -> dict:
    return {"name": "gpu_check_oom", "description": "issue 16: a cell that runs out of memory, then one that runs",
            "dataset": "synthetic", "defaults": {"pretrained": False, "mode": "throughput"},
            "include": [dict(sizes.oom), dict(sizes.after_oom)]}
