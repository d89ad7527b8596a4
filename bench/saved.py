"""A trained cell kept for use (`save_model: best | all`): its weights as safetensors beside a small JSON that says
how to rebuild and feed the model, and `predict`, which classifies image files with it exactly as the cell's own
test pass would have (the same stored framing, resize, interpolation, normalisation and precision).

The safetensors file holds every weight, so the cell's own `weights:` file is not needed again; its header
records the state dict's module versions (MNASNet refuses a state without them).

The worker writes the two files into its cell's temporary folder; the runner alone moves them into
`results/SUITE/models/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.errors import BenchError

WEIGHTS, META = "model.safetensors", "model.json"
FORMAT = 1
VERSIONS = "bench_module_versions"  # the safetensors header's key for the state dict's `_metadata`, as JSON
PREDICT_BATCH = 64  # images at once on the CPU, at most: the cell's own batches where smaller


@dataclass(frozen=True)
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class name, probability), most likely first


def save(folder: Path, model, cell, classes: list[str], recipe, stored_resolution: int | None, row: dict) -> None:
    """Write the cell's trained model (weights and how to use them) into `folder`."""
    from safetensors.torch import save_file

    from bench.train import weightstate

    state = weightstate.full_state(model)  # copies of their own: safetensors refuses tensors sharing storage
    save_file(dict(state), str(folder / WEIGHTS), metadata={VERSIONS: json.dumps(weightstate.metadata(state))})
    meta = {
        "format": FORMAT, "cell_id": cell.id, "cell": json.loads(cell.canonical()), "classes": classes,
        "recipe": {"mean": list(recipe.mean), "std": list(recipe.std), "interpolation": recipe.interpolation},
        "stored_resolution": stored_resolution, "val_top1_best": row.get("val_top1_best"), "top1": row.get("top1"),
        "precision": row.get("precision"),  # resolved (never auto): what the cell's test pass ran under
    }
    (folder / META).write_text(json.dumps(meta, indent=1))


def read_weights(weights_file: Path):
    """The saved tensors, as a state carrying the module versions the file's header records (files from before it
    did carry none: restoring then takes the model's own)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from bench.train import weightstate

    with safe_open(str(weights_file), framework="pt") as handle:
        header = handle.metadata() or {}
    return weightstate.with_metadata(load_file(str(weights_file)), json.loads(header.get(VERSIONS, "{}")))


def _saved_cell(meta: dict):
    """The cell's architecture, built without its weights: the saved file holds every one, so a `weights:`
    file of the cell's own (whose architecture is the default weights') need not exist any more."""
    from bench.suite import Cell
    from bench.weights import is_file_weights

    weights = meta["cell"].get("weights")
    return Cell.model_validate({**meta["cell"], "pretrained": False,
                                "weights": None if is_file_weights(weights) else weights})


def load(weights_file: Path):
    """The model (eval mode, on the CPU) and its metadata, from a `.safetensors` file with its `.json` beside it."""
    import torch
    from safetensors import SafetensorError

    from bench import models
    from bench.recipe import InputRecipe
    from bench.train import weightstate

    weights_file = Path(weights_file)
    meta_file = weights_file.with_suffix(".json")
    if not weights_file.is_file() or not meta_file.is_file():
        raise BenchError(f"{weights_file}: a saved model is a .safetensors file with its .json beside it, and "
                         f"{weights_file if not weights_file.is_file() else meta_file} is missing; pass a file from "
                         "results/SUITE/models/")
    try:
        meta = json.loads(meta_file.read_text())
        cell = _saved_cell(meta)
        state = read_weights(weights_file)
    except (ValueError, KeyError, OSError, SafetensorError) as exc:
        raise BenchError(f"{weights_file}: not a model saved by bench ({exc.__class__.__name__}: {exc}); pass a file "
                         "from results/SUITE/models/") from None
    torch.manual_seed(0)
    model = models.build(cell, len(meta["classes"])).model
    weightstate.restore(model, state, strict=True)
    recipe = InputRecipe(tuple(meta["recipe"]["mean"]), tuple(meta["recipe"]["std"]), meta["recipe"]["interpolation"])
    return model.eval(), meta, cell, recipe


def predict(weights_file: Path, images: list[Path], top: int = 3) -> list[Prediction]:
    """The `top` most likely classes of each image file."""
    import torch

    from bench.imagefolder import stored_image
    from bench.loader import DeviceLoader
    from bench.data import ImageArrays
    from bench.train.step import autocast

    model, meta, cell, recipe = load(weights_file)
    side = meta["stored_resolution"] or cell.resolution
    arrays = ImageArrays(np.stack([stored_image(str(p), side) for p in images]), np.zeros(len(images), np.int64))
    cpu = torch.device("cpu")
    # The cell's batches where they fit, so reduced-precision sums round as in its test pass
    loader = DeviceLoader(arrays, batch_size=min(cell.batch_size, PREDICT_BATCH), resolution=cell.resolution,
                          device=cpu, augment="none", train=False, channels_last=cell.channels_last, recipe=recipe)
    out, k = [], min(top, len(meta["classes"]))
    precision = meta.get("precision") or "fp32"  # files from before precision was recorded ran fp32 here
    with torch.inference_mode():
        for x, _ in loader:
            with autocast(precision, cpu):
                logits = model(x)
            probs = torch.softmax(logits.float(), dim=1)
            values, indices = probs.topk(k, dim=1)
            for v, i in zip(values.tolist(), indices.tolist()):
                out.append([(meta["classes"][c], p) for c, p in zip(i, v)])
    return [Prediction(str(p), t) for p, t in zip(images, out)]
