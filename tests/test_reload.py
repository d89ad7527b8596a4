"""Every path that reloads weights, over every torchvision family of the registry: the weights restored equal the
weights kept. The smallest member of each family is built with random init (no forward runs, so every family
takes part at its smallest size); what training can change is scrambled between keeping and restoring.

The state dict's module versions are the trap: MNASNet refuses a state without them, and a plain dict of tensors
has none (a best epoch that was not the last failed a real CIFAR-10 run that way).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torchvision.models import get_model_builder, get_model_weights

from bench import models, saved
from bench.suite import Cell
from bench.train import weightstate
from bench.train.fit import BestWeights

pytestmark = pytest.mark.usefixtures("small_cpu_kernels")  # tests/conftest.py


def _families() -> dict[str, str]:
    """{family: its smallest member}: a family is the torchvision module that builds it (resnet holds ResNet,
    ResNeXt and Wide ResNet), its size the parameter count torchvision's default weights record."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in models.list_models("tv:*"):
        arch = name.partition(":")[2]
        groups[get_model_builder(arch).__module__.rpartition(".")[2]].append(name)

    def size(name: str) -> int:
        return get_model_weights(name.partition(":")[2]).DEFAULT.meta["num_params"]

    return {family: min(names, key=lambda n: (size(n), n)) for family, names in sorted(groups.items())}


FAMILIES = _families()


def _build(name: str) -> tuple[nn.Module, Cell]:
    cell = Cell(model=name, pretrained=False, resolution=max(models.info(name).min_resolution, 8), freeze=0.5)
    torch.manual_seed(0)
    return models.build(cell, num_classes=3).model, cell


def _scramble(model: nn.Module) -> None:
    """Change every tensor training could change, as a few steps would (and more surely: each one moves)."""
    changing = set(weightstate.changing_state(model, copy=False))
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key in changing and tensor.dtype == torch.bool:
                tensor.logical_not_()
            elif key in changing:
                tensor.add_(1)


# Each path: keep (model, cell, folder) -> what restore needs; restore (model, that) -> None.
def _best_keep(model, cell, folder):
    keeper = BestWeights(model)
    keeper.keep(epoch=0)
    return keeper


def _best_restore(model, keeper):
    keeper.restore()
    keeper.close()


def _file_keep(model, cell, folder):
    weightstate.save(folder / "state.pt", weightstate.changing_state(model))
    return folder / "state.pt"


def _saved_keep(model, cell, folder):
    saved.save(folder, model, cell, ["a", "b", "c"], models.cell_recipe(cell), None, {"precision": "fp32"})
    return folder / saved.WEIGHTS


PATHS: dict[str, tuple[Callable, Callable]] = {
    "best epoch (BestWeights)": (_best_keep, _best_restore),
    "weight state file (resume)": (_file_keep, lambda m, path: weightstate.restore(m, weightstate.load(path))),
    "saved model (bench predict)": (_saved_keep, lambda m, path: weightstate.restore(m, saved.read_weights(path),
                                                                                    strict=True)),
}


@pytest.mark.parametrize("name", FAMILIES.values(), ids=FAMILIES.keys())
def test_every_reload_path_restores_the_weights_kept(name, tmp_path):
    model, cell = _build(name)
    state = model.state_dict()
    before = weightstate.with_metadata({k: v.clone() for k, v in state.items()}, weightstate.metadata(state))
    failed = {}
    for i, (path, (keep, restore)) in enumerate(PATHS.items()):
        folder = tmp_path / str(i)
        folder.mkdir()
        kept = keep(model, cell, folder)
        _scramble(model)
        try:
            restore(model, kept)
            wrong = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
            if wrong:
                failed[path] = f"{len(wrong)} tensors differ ({', '.join(wrong[:3])})"
        except Exception as exc:  # noqa: BLE001 - a path that fails is reported with the others
            failed[path] = f"{type(exc).__name__}: {exc}"[:200]
        model.load_state_dict(before)  # the next path starts from the same weights
    assert not failed, failed


def test_a_saved_mnasnet_loads_for_predict(tmp_path):
    """`bench predict`'s own load (saved.load): the architecture rebuilt, every weight put back, versions kept."""
    model, cell = _build("tv:mnasnet0_5")
    _scramble(model)
    saved.save(tmp_path, model, cell, ["a", "b", "c"], models.cell_recipe(cell), None, {"precision": "fp32"})
    loaded = saved.load(tmp_path / saved.WEIGHTS)[0]
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_weight_state_file_keeps_versions_and_never_half_writes(tmp_path, monkeypatch):
    model, _ = _build("tv:mnasnet0_5")
    state = weightstate.changing_state(model)
    weightstate.save(tmp_path / "state.pt", state)
    raw = torch.load(tmp_path / "state.pt", weights_only=True)  # what a reader without bench finds
    assert raw["metadata"][""]["version"] == 2 and set(raw["tensors"]) == set(state)
    assert weightstate.metadata(weightstate.load(tmp_path / "state.pt")) == weightstate.metadata(state)
    before = (tmp_path / "state.pt").read_bytes()

    def disk_full(obj, handle):
        handle.write(b"PK half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):  # a write that fails midway leaves the old file and no temporary beside it
        weightstate.save(tmp_path / "state.pt", state)
    monkeypatch.undo()
    assert (tmp_path / "state.pt").read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]
    (tmp_path / "cut.pt").write_bytes(before[: len(before) // 2])
    with pytest.raises(weightstate.StateError, match="cannot be read"):
        weightstate.load(tmp_path / "cut.pt")


def test_a_changing_state_is_a_copy_that_leaves_frozen_weights_out():
    model, _ = _build("tv:resnet18")
    state = weightstate.changing_state(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable <= set(state) and not frozen & set(state) and "bn1.running_mean" in set(state)
    _scramble(model)  # on the CPU, .cpu() alone would have kept the model's own tensors, scrambled with it
    assert not any(torch.equal(v, model.state_dict()[k]) for k, v in state.items() if v.is_floating_point())


def test_restoring_another_models_state_names_the_keys(tmp_path):
    model, _ = _build("tv:mnasnet0_5")
    with pytest.raises(weightstate.StateError, match="1 unexpected \\(extra.weight\\)"):
        weightstate.restore(model, {"extra.weight": torch.zeros(1)})
    with pytest.raises(weightstate.StateError, match="missing"):
        weightstate.restore(model, weightstate.changing_state(model), strict=True)


def test_a_checkpoint_of_your_own_loads_into_mnasnet(tmp_path):
    model, _ = _build("tv:mnasnet0_5")
    torch.save(model.state_dict(), tmp_path / "own.pth")
    cell = Cell(model="tv:mnasnet0_5", pretrained=True, weights=str(tmp_path / "own.pth"), resolution=8)
    loaded = models.build(cell, num_classes=3).model
    assert torch.equal(loaded.layers[0].weight, model.layers[0].weight)
