"""A trained cell kept for use (`save_model: best | all`): its weights as safetensors beside a small JSON that says
how to rebuild and feed the model, and `predict`, which classifies image files with it exactly as the cell's own
test pass would have (the same stored framing, resize, interpolation and normalisation).

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


@dataclass(frozen=True)
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class name, probability), most likely first


def save(folder: Path, model, cell, classes: list[str], recipe, stored_resolution: int | None, row: dict) -> None:
    """Write the cell's trained model (weights and how to use them) into `folder`."""
    from safetensors.torch import save_file

    # clone(): safetensors refuses tensors that share storage (tied weights), and the file must not alias them.
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    meta = {
        "format": FORMAT, "cell_id": cell.id, "cell": json.loads(cell.canonical()), "classes": classes,
        "recipe": {"mean": list(recipe.mean), "std": list(recipe.std), "interpolation": recipe.interpolation},
        "stored_resolution": stored_resolution, "val_top1_best": row.get("val_top1_best"), "top1": row.get("top1"),
    }
    (folder / META).write_text(json.dumps(meta, indent=1))


def load(weights_file: Path):
    """The model (eval mode, on the CPU) and its metadata, from a `.safetensors` file with its `.json` beside it."""
    import torch
    from safetensors.torch import load_file

    from bench import models
    from bench.recipe import InputRecipe
    from bench.suite import Cell

    weights_file = Path(weights_file)
    meta_file = weights_file.with_suffix(".json")
    if not weights_file.is_file() or not meta_file.is_file():
        raise BenchError(f"{weights_file}: a saved model is a .safetensors file with its .json beside it, and "
                         f"{weights_file if not weights_file.is_file() else meta_file} is missing; pass a file from "
                         "results/SUITE/models/")
    try:
        meta = json.loads(meta_file.read_text())
        cell = Cell.model_validate({**meta["cell"], "pretrained": False, "weights": meta["cell"].get("weights")})
        state = load_file(str(weights_file))
    except (ValueError, KeyError, OSError) as exc:
        raise BenchError(f"{weights_file}: not a model saved by bench ({exc.__class__.__name__}: {exc}); pass a file "
                         "from results/SUITE/models/") from None
    torch.manual_seed(0)
    model = models.build(cell, len(meta["classes"])).model
    model.load_state_dict(state)
    recipe = InputRecipe(tuple(meta["recipe"]["mean"]), tuple(meta["recipe"]["std"]), meta["recipe"]["interpolation"])
    return model.eval(), meta, cell, recipe


def predict(weights_file: Path, images: list[Path], top: int = 3) -> list[Prediction]:
    """The `top` most likely classes of each image file."""
    import torch

    from bench.imagefolder import stored_image
    from bench.loader import DeviceLoader
    from bench.data import ImageArrays

    model, meta, cell, recipe = load(weights_file)
    side = meta["stored_resolution"] or cell.resolution
    arrays = ImageArrays(np.stack([stored_image(str(p), side) for p in images]), np.zeros(len(images), np.int64))
    loader = DeviceLoader(arrays, batch_size=64, resolution=cell.resolution, device=torch.device("cpu"),
                          augment="none", train=False, channels_last=cell.channels_last, recipe=recipe)
    out, k = [], min(top, len(meta["classes"]))
    with torch.inference_mode():
        for x, _ in loader:
            probs = torch.softmax(model(x).float(), dim=1)
            values, indices = probs.topk(k, dim=1)
            for v, i in zip(values.tolist(), indices.tolist()):
                out.append([(meta["classes"][c], p) for c, p in zip(i, v)])
    return [Prediction(str(p), t) for p, t in zip(images, out)]
