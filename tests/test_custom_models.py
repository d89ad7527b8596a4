"""Your own architectures (`py:` models), your own checkpoints (`weights: file`), hub-cache models and what a
broken cache says, and the suite's `input_mean` / `input_std`. Checkpoints are written here with random values;
nothing is downloaded."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import torchvision
from torch import nn

from bench import models, zoo
from bench.errors import ResolutionError, SuiteError, UnknownModelError, WeightsUnavailableError
from bench.suite import Cell, parse_suite
from bench.validate import resolve_cells
from bench.weights import CheckpointError

CNN = "py:bench.zoo.small_cnn:small_cnn"
CNN_FILE = Path(zoo.__file__).with_name("small_cnn.py")


pytestmark = pytest.mark.usefixtures("small_cpu_kernels")  # tests/conftest.py


def cell(model: str, **fields) -> Cell:
    return Cell(model=model, pretrained=fields.pop("pretrained", False), **fields)


def validate(tmp_path: Path, **suite) -> list[Cell]:
    raw = {"name": "t", "dataset": "synthetic", **suite}
    return resolve_cells(parse_suite(raw, source=str(tmp_path / "suite.yaml")))


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and ". " not in message, message
    return message


# --- py: models ----------------------------------------------------------------------------------------------------


def test_zoo_cnn_has_limits_flops_freeze_and_provenance():
    info = models.info(CNN)
    assert (info.source, info.native_resolution, info.min_resolution, info.fixed_resolution) == ("python", 32, 8, False)
    with pytest.raises(ResolutionError, match=r"needs at least 8 px \(native 32\)"):
        models.check_resolution(CNN, 7)
    flops32, flops64 = models.flops_per_image(CNN, 32), models.flops_per_image(CNN, 64)
    assert flops32 > 0 and 3.5 < flops64 / flops32 < 4.1  # convolutions dominate: 4x the pixels
    bb = models.build(cell(CNN, freeze=3, resolution=32), 10)
    assert bb.head_paths == ("classifier.3",) and bb.head.out_features == 10
    assert bb.frozen_layers == bb.total_layers - 3 and 0 < bb.trainable_params < bb.total_params
    assert bb.model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert bb.weights is None and bb.recipe.mean == (0.4914, 0.4822, 0.4465)  # what the model declares
    assert bb.provenance() == {"model_source_file": str(CNN_FILE.resolve()), "weights_sha256": None,
                               "model_source_sha256": hashlib.sha256(CNN_FILE.read_bytes()).hexdigest()}


NET = '''
from torch import nn

class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.out(self.body(x))

def make(num_classes):
    return Net(num_classes), "out"

def plain(num_classes):
    return Net(num_classes)
'''


def test_py_model_from_a_file_and_from_a_module_resolve_against_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "file_net.py").write_text(NET)
    (tmp_path / "cwd_module_net.py").write_text(NET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    cells = validate(tmp_path, grid={"model": ["py:nets/file_net.py:make", "py:cwd_module_net:plain"]},
                     defaults={"freeze": 1, "resolution": 16})
    assert [c.model for c in cells] == ["py:nets/file_net.py:make", "py:cwd_module_net:plain"]
    declared, found = (models.build(c, 5) for c in cells)
    assert declared.head_paths == found.head_paths == ("out",)  # named by the factory; found by bench
    assert declared.frozen_layers == 1 and declared.total_layers == 2
    assert declared.model_source_file == str(tmp_path / "nets" / "file_net.py")
    assert declared.model_source_sha256 == found.model_source_sha256 == hashlib.sha256(NET.encode()).hexdigest()
    assert models.info("py:cwd_module_net:plain").native_resolution == 224  # says nothing: the first size it takes


BROKEN = {
    "py:no_such_module_xyz:make": r"importing no_such_module_xyz failed \(ModuleNotFoundError",
    "py:broken/syntax.py:make": r"running .*syntax\.py failed \(SyntaxError",
    "py:broken/nets.py:missing": r"has no attribute 'missing'; define `def missing\(num_classes\)",
    "py:broken/nets.py:returns_dict": r"returned a dict, not an nn\.Module or \(nn\.Module, head_path\)",
    "py:broken/nets.py:raises": r"raises\(num_classes=1000\) raised ValueError: no such width; fix the factory",
    "py:broken/nets.py:bad_head": r"names head 'fc', which is not a submodule",
    "py:broken/absent.py:make": r"no file .*absent\.py \(relative paths count from the current directory",
    "py:just_a_name": r"expected py:package\.module:factory or py:path/to/file\.py:factory",
}


@pytest.mark.parametrize("name,expected", BROKEN.items(), ids=list(BROKEN))
def test_py_model_that_cannot_load_is_one_error_at_validate(tmp_path, monkeypatch, name, expected):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "syntax.py").write_text("def make(num_classes):\n    return (\n")
    (tmp_path / "broken" / "nets.py").write_text(
        "from torch import nn\n"
        "def returns_dict(num_classes):\n    return {'model': nn.Linear(3, num_classes)}\n"
        "def raises(num_classes):\n    raise ValueError('no such width')\n"
        "def bad_head(num_classes):\n    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes)), 'fc'\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SuiteError, match=expected) as caught:
        validate(tmp_path, grid={"model": [name]})
    assert one_line(caught).startswith(f"{tmp_path / 'suite.yaml'}: {name}: ")


def test_py_model_through_validate_run_and_report(tmp_path, monkeypatch):
    """A py: file model, relative to the current directory, runs in a real worker process and reaches the report."""
    from bench.report import build_report
    from bench.runner import RunOptions, run_suite
    from bench.store import ResultStore

    (tmp_path / "mine.py").write_text(NET)
    monkeypatch.chdir(tmp_path)
    raw = {"name": "mine", "dataset": "synthetic", "grid": {"model": ["py:mine.py:make"]},
           "defaults": {"resolution": 16, "batch_size": 16, "epochs": 1, "steps": 2, "train_subset": 64,
                        "test_subset": 32, "infer_bench": "off", "pretrained": False}}
    suite = parse_suite(raw, source="mine.yaml")
    summary = run_suite(suite, resolve_cells(suite), RunOptions(results=tmp_path / "results"))
    (row,) = summary.rows
    assert row["status"] == "ok", row.get("error")
    assert row["model"] == "py:mine.py:make" and row["trainable_params"] == row["total_params"]
    assert row["flops_per_image"] and 0 <= row["top1"] <= 1
    outcome = build_report(tmp_path / "results", tmp_path / "reports")
    assert outcome.rows == 1 and "py:mine.py:make" in outcome.markdown.read_text()
    stored = ResultStore(tmp_path / "results").read().cells.iloc[0]
    assert stored["model_source_sha256"] == hashlib.sha256(NET.encode()).hexdigest()


# --- checkpoints of your own ---------------------------------------------------------------------------------------


def test_checkpoint_with_a_prefix_under_a_wrapper_key_loads(tmp_path):
    reference = torchvision.models.resnet18()
    path = tmp_path / "ddp.pth"
    wrapped = {f"module.{k}": v for k, v in reference.state_dict().items()}
    torch.save({"epoch": 7, "state_dict": wrapped, "optimizer": {"lr": 0.1}}, path)
    (checked,) = validate(tmp_path, grid={"model": ["resnet18"]}, defaults={"weights": str(path)})
    bb = models.build(checked.model_copy(update={"freeze": 0.5}), 10)
    assert bb.weights == str(path) and bb.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(bb.model.state_dict()[key], value), key
    # Inputs follow the architecture's default weights, since a file says nothing about its statistics.
    assert bb.recipe == models.input_recipe("resnet18")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_backbone_only_checkpoint_loads_into_timm_and_torchvision(tmp_path, suffix):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    for name, reference in [("timm:resnet18", timm.create_model("resnet18")), ("resnet18", torchvision.models.resnet18())]:
        body = {k: v.contiguous() for k, v in reference.state_dict().items() if not k.startswith("fc.")}
        path = tmp_path / f"{name.replace(':', '_')}{suffix}"
        save_file(body, path) if suffix == ".safetensors" else torch.save({"model": body}, path)
        bb = models.build(cell(name, pretrained=True, weights=str(path), freeze="all"), 10)
        assert torch.equal(bb.model.conv1.weight, reference.conv1.weight), name
        assert bb.trainable_params == sum(p.numel() for p in bb.head.parameters())


def test_checkpoint_without_auxiliary_branch_loads_into_inception(tmp_path):
    reference = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    path = tmp_path / "inception.pth"
    torch.save(reference.state_dict(), path)
    bb = models.build(cell("inception_v3", pretrained=True, weights=str(path), resolution=75), 10)
    assert bb.model.AuxLogits is None and torch.equal(bb.model.Mixed_7c.branch1x1.conv.weight,
                                                      reference.Mixed_7c.branch1x1.conv.weight)


def test_checkpoint_with_wrong_keys_is_one_clear_error(tmp_path):
    resnet34 = torchvision.models.resnet34().state_dict()
    renamed = {("encoder." + k if k.startswith("layer4") else k): v for k, v in torchvision.models.resnet18().state_dict().items()}
    torch.save(resnet34, tmp_path / "r34.pth")
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(SuiteError, match=r"96 unexpected \(layer1\.2\.conv1\.weight, layer1\.2\.bn1\.weight, ") as caught:
        validate(tmp_path, grid={"model": ["resnet18"]}, defaults={"weights": str(tmp_path / "r34.pth")})
    assert "the classifier's keys aside" in one_line(caught)
    with pytest.raises(CheckpointError) as caught:
        models.build(cell("resnet18", pretrained=True, weights=str(tmp_path / "renamed.pth")), 10)
    message = one_line(caught)
    assert "25 missing (layer4.0.conv1.weight, layer4.0.bn1.weight, layer4.0.bn1.bias, ...)" in message
    assert "30 unexpected (encoder.layer4.0.conv1.weight" in message and "fc." not in message
    # Same keys, another variant: the shapes say so.
    wide = torchvision.models.resnet18(num_classes=10).state_dict() | {"conv1.weight": torch.zeros(32, 3, 7, 7)}
    torch.save(wide, tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match=r"1 of another shape \(conv1\.weight: 32x3x7x7 here, 64x3x7x7 in"):
        models.build(cell("resnet18", pretrained=True, weights=str(tmp_path / "wide.pth")), 10)


def test_unreadable_checkpoints_say_why(tmp_path):
    torch.save({"model": torchvision.models.resnet18().state_dict(), "args": argparse.Namespace(lr=0.1)},
               tmp_path / "with_args.pth")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "whole.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:100_000])
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "empty.pth")
    expected = {"with_args.pth": "holds Python objects besides tensors", "cut.pth": r"is truncated or corrupt \(100,000 bytes",
                "empty.pth": "holds no state dict", "absent.pth": "weights file .*absent.pth not found"}
    for file, pattern in expected.items():
        with pytest.raises(SuiteError, match=pattern) as caught:
            validate(tmp_path, grid={"model": ["resnet18"]}, defaults={"weights": str(tmp_path / file)})
        one_line(caught)


def test_py_model_takes_a_checkpoint_file(tmp_path):
    reference = zoo.call("bench.zoo.small_cnn:small_cnn", 10)[0]
    torch.save(reference.state_dict(), tmp_path / "cnn.pt")
    bb = models.build(cell(CNN, pretrained=True, weights=str(tmp_path / "cnn.pt")), 4)
    assert torch.equal(bb.model.features[0][0].weight, reference.features[0][0].weight)
    assert bb.weights == str(tmp_path / "cnn.pt") and bb.weights_sha256 and bb.model_source_sha256
    with pytest.raises(UnknownModelError, match="is not a file path"):
        models.build(cell(CNN, pretrained=True, weights="IMAGENET1K_V1"), 4)


# --- input statistics ----------------------------------------------------------------------------------------------


def test_suite_input_mean_and_std_override_the_weights_recipe(tmp_path):
    (plain, custom) = validate(tmp_path, grid={"model": ["timm:resnet18"] if _has_timm() else ["resnet18"],
                                               "input_mean": [None, [0.5, 0.4, 0.3]]},
                               defaults={"input_std": [0.25, 0.25, 0.25], "pretrained": False})
    assert plain.input_mean is None and custom.input_mean == (0.5, 0.4, 0.3) and plain.id != custom.id
    weights = models.input_recipe(plain.model)
    recipe = models.build(custom, 10).recipe
    assert (recipe.mean, recipe.std, recipe.interpolation) == ((0.5, 0.4, 0.3), (0.25,) * 3, weights.interpolation)
    assert models.cell_recipe(plain).mean == weights.mean and models.cell_recipe(plain).std == (0.25,) * 3
    assert "input_mean and input_std" in models.cell_recipe(custom).source
    assert Cell(model="resnet18").id == Cell(model="resnet18", input_mean=None).id  # no field: old ids stand
    with pytest.raises(SuiteError, match="input_std"):
        validate(tmp_path, grid={"model": ["resnet18"]}, defaults={"input_std": [0.2, 0, 0.2]})


def _has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


# --- library caches: hub names, and what is wrong with what is there ---------------------------------------------


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    pytest.importorskip("timm")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf"


def _hub_repo(cache: Path, repo: str, files: dict[str, object]) -> Path:
    """huggingface_hub's cache layout: refs/main names a snapshot folder holding the files."""
    from safetensors.torch import save_file

    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    for name, content in files.items():
        if isinstance(content, dict) and name.endswith(".safetensors"):
            save_file(content, snapshot / name)
        else:
            (snapshot / name).write_text(json.dumps(content))
    return folder


def test_hf_hub_model_loads_from_the_hub_cache(hub_cache):
    timm = pytest.importorskip("timm")
    reference = timm.create_model("resnet18")
    config = {"architecture": "resnet18", "num_classes": 1000,
              "pretrained_cfg": {"input_size": [3, 224, 224], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                                 "classifier": "fc", "num_classes": 1000}}
    _hub_repo(hub_cache, "someone/tiny-resnet", {"config.json": config, "model.safetensors": reference.state_dict()})
    name = "timm:hf-hub:someone/tiny-resnet"
    (checked,) = validate(hub_cache, grid={"model": [name]}, defaults={"pretrained": True, "freeze": "all"})
    assert models.input_recipe(name).mean == (0.5, 0.5, 0.5)
    bb = models.build(checked, 10)
    assert bb.weights == "hf-hub" and torch.equal(bb.model.conv1.weight, reference.conv1.weight)
    with pytest.raises(WeightsUnavailableError, match="models--someone--absent is not in"):
        models.build(cell("timm:hf-hub:someone/absent"), 10)  # even random init needs its config.json


def test_incomplete_hub_cache_says_what_is_wrong_with_it(hub_cache):
    folder = _hub_repo(hub_cache, "timm/resnet18.a1_in1k", {})
    with pytest.raises(WeightsUnavailableError, match=r"has snapshot 000000000000 without model\.safetensors"):
        models.build(cell("timm:resnet18", pretrained=True), 10)
    (folder / "refs" / "main").unlink()
    with pytest.raises(WeightsUnavailableError) as caught:
        models.build(cell("timm:resnet18", pretrained=True), 10)
    message = one_line(caught)
    assert "models--timm--resnet18.a1_in1k" in message and "has no refs/main" in message and "not cached" not in message


def test_truncated_cached_file_says_it_is_truncated(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    file = checkpoints / Path(urlparse(torchvision.models.get_model_weights("resnet18").DEFAULT.url).path).name
    torch.save(torchvision.models.resnet18().state_dict(), file)
    file.write_bytes(file.read_bytes()[:1_000_000])
    with pytest.raises(WeightsUnavailableError) as caught:
        models.build(cell("resnet18", pretrained=True), 10)
    message = one_line(caught)
    assert f"{file.name} in {checkpoints} is truncated or corrupt (1,000,000 bytes" in message
    assert f"delete {file}" in message and "bench fetch tv:resnet18" in message
    file.write_bytes(b"")
    with pytest.raises(WeightsUnavailableError, match=f"{file.name} in .* is empty"):
        models.build(cell("resnet18", pretrained=True), 10)


def test_a_factory_module_that_is_not_a_model_name_stays_out_of_listings():
    assert all(not n.startswith("py:") for n in models.list_models())
    assert models.resolve(CNN) == [CNN]
    with pytest.raises(UnknownModelError):
        models.resolve("py:bench.zoo.small_cnn:no_such_factory")
    assert isinstance(zoo.call("bench.zoo.small_cnn:small_cnn", 3)[0], nn.Module)
