"""The backbone registry, heads, freeze policies, resolution limits, FLOPs and the offline weights path.

Every torchvision classifier is built through `build()`; the per-model checks run with parameters on the meta
device (no memory, no init time) and a real CPU forward wherever it costs little, so the file runs in minutes on
two cores. One representative per family trains a real step on the CPU.
"""

from __future__ import annotations

import copy
import pickle
import socket
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bench import models, registry, weights
from bench.errors import ResolutionError, UnknownModelError, WeightsUnavailableError
from bench.suite import Cell

TV_MODELS = models.list_models("tv:*")
FREEZES = ["all", "none", 0.5, 3]
REAL_FORWARD_MAX_PARAMS_M = 30  # above this the per-model forward runs on the meta device


pytestmark = pytest.mark.usefixtures("small_cpu_kernels")  # tests/conftest.py


def cell(model: str, **fields) -> Cell:
    return Cell(model=model, pretrained=fields.pop("pretrained", False), **fields)


def small_resolution(name: str) -> int:
    return max(models.info(name).min_resolution, 8)  # a Cell takes 8 px and up


# --- expectations computed here, independently of bench.freeze ---------------------------------------------------


def in_head(path: str, head_paths: tuple[str, ...]) -> bool:
    return any(path == h or path.startswith(h + ".") for h in head_paths)


def expected_trainable(model: nn.Module, head_paths: tuple[str, ...], freeze) -> tuple[set[str], int, int]:
    """(names of parameters that must train, frozen layer count, layer count) from the freeze rule as documented."""
    layers = [
        (path, module)
        for path, module in model.named_modules()
        if not in_head(path, head_paths) and any(v is not None for v in module._parameters.values())
    ]
    total = len(layers)
    if isinstance(freeze, str):
        frozen = {"all": total, "none": 0}[freeze]
    else:  # a fraction freezes from the input side; an integer n trains the last n layers
        frozen = int(freeze * total) if isinstance(freeze, float) else max(total - freeze, 0)
    frozen_names = {f"{p}.{n}".lstrip(".") for p, m in layers[:frozen] for n, _ in m.named_parameters(recurse=False)}
    return {n for n, _ in model.named_parameters()} - frozen_names, frozen, total


def check_freeze(bb: models.Backbone, freeze) -> None:
    want, frozen, total = expected_trainable(bb.model, bb.head_paths, freeze)
    got = {n for n, p in bb.model.named_parameters() if p.requires_grad}
    assert got == want, f"freeze={freeze}: unexpected {sorted(got - want)[:3]}, missing {sorted(want - got)[:3]}"
    assert (bb.frozen_layers, bb.total_layers) == (frozen, total)
    assert bb.trainable_params == sum(p.numel() for p in bb.model.parameters() if p.requires_grad)
    assert bb.total_params == sum(p.numel() for p in bb.model.parameters())
    assert all(p.requires_grad for p in bb.head.parameters())


def check_batchnorm(bb: models.Backbone) -> None:
    """After model.train(), a BatchNorm is in eval mode exactly when its layer (or the region it sits in) is frozen."""
    bb.model.train()
    previous_frozen = False
    for path, module in bb.model.named_modules():
        if in_head(path, bb.head_paths):
            assert module.training, f"{path} is part of the head and must train"
            continue
        own = list(module.parameters(recurse=False))
        if own:
            previous_frozen = not own[0].requires_grad
        if isinstance(module, _BatchNorm):
            assert module.training is not previous_frozen, f"{path}: frozen={previous_frozen}"


# --- every torchvision classifier ------------------------------------------------------------------------------


@contextmanager
def meta_builds_sharing_construction():
    """Parameters on meta, and each architecture constructed once, then deep-copied: four builds cost about one."""
    made: dict[tuple, nn.Module] = {}
    construct = models._create

    def create(name, weights, **kw):
        key = (name, weights, *sorted(kw.items()))
        if key not in made:
            made[key] = construct(name, weights, **kw)
        return copy.deepcopy(made[key])

    with pytest.MonkeyPatch.context() as patch, models.meta_init():
        for module in (registry, models):  # skeletons and head paths are built in registry, real models in models
            patch.setattr(module, "_create", create)
        yield


@pytest.mark.parametrize("name", TV_MODELS)
def test_every_torchvision_model_builds_with_each_freeze_policy(name):
    resolution = small_resolution(name)
    with meta_builds_sharing_construction():
        builds = {f: models.build(cell(name, resolution=resolution, freeze=f), num_classes=10) for f in FREEZES}
    for freeze, bb in builds.items():
        assert bb.weights is None and bb.head_paths[0] in dict(bb.model.named_modules())
        check_freeze(bb, freeze)
        check_batchnorm(bb)
    assert builds["all"].trainable_params == sum(p.numel() for p in builds["all"].head.parameters())
    assert builds["none"].trainable_params == builds["none"].total_params

    if models.info(name).params_m <= REAL_FORWARD_MAX_PARAMS_M:  # real kernels at the smallest size bench claims
        model, device = models.build(cell(name, resolution=resolution), num_classes=10).model, "cpu"
    else:  # big ones: the same forward on the meta device, shapes only
        model, device = builds[0.5].model, "meta"
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, resolution, resolution, device=device))
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == (2, 10)


@pytest.mark.parametrize("name", TV_MODELS)
def test_every_torchvision_model_reports_consistent_limits(name):
    i = models.info(name)
    assert i.name == name and i.source == "torchvision" and i.params_m > 0.5
    assert i.default_weights == torchvision.models.get_model_weights(name[3:]).DEFAULT.name
    assert 1 <= i.min_resolution <= i.native_resolution
    models.check_resolution(name, i.native_resolution)
    models.check_resolution(name, i.min_resolution)
    if i.min_resolution > 1:
        with pytest.raises(ResolutionError, match=f"{name} cannot take {i.min_resolution - 1} px"):
            models.check_resolution(name, i.min_resolution - 1)
    assert i.fixed_resolution == (i.min_resolution == i.native_resolution and name.split(":")[1].startswith("vit"))


# --- one representative per family trains a real step on the CPU --------------------------------------------------

FAMILIES = [
    ("resnet18", None), ("resnext50_32x4d", None), ("wide_resnet50_2", None), ("alexnet", None), ("vgg11_bn", None),
    ("densenet121", None), ("mobilenet_v2", None), ("mobilenet_v3_small", None), ("efficientnet_b0", None),
    ("efficientnet_v2_s", None), ("convnext_tiny", None), ("regnet_y_400mf", None), ("regnet_x_400mf", None),
    ("shufflenet_v2_x0_5", None), ("squeezenet1_1", None), ("mnasnet0_5", None), ("googlenet", None),
    ("inception_v3", None), ("inception_v3", 299), ("swin_t", None), ("swin_v2_t", None), ("maxvit_t", None),
    ("vit_b_16", None),
]


@pytest.mark.parametrize("name,resolution", FAMILIES)
def test_family_representative_trains_one_step(name, resolution):
    resolution = resolution or max(small_resolution(name), 32)
    batch = 1 if models.info(name).fixed_resolution else 2  # ViT at 224 px: one image keeps the CPU step short
    torch.manual_seed(0)
    bb = models.build(cell(name, resolution=resolution, freeze=0.5), num_classes=10)
    norms = {p: m for p, m in bb.model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}
    stats = {p: m.running_mean.clone() for p, m in norms.items()}
    bb.model.train()
    out = bb.model(torch.randn(batch, 3, resolution, resolution))
    logits, aux = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
    assert logits.shape == (batch, 10) and all(a.shape == (batch, 10) for a in aux)
    target = torch.arange(batch)
    loss = sum(w * nn.functional.cross_entropy(o, target) for w, o in [(1.0, logits), *((0.4, a) for a in aux)])
    loss.backward()
    for pname, p in bb.model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, pname
    assert all(torch.isfinite(p.grad).all() for p in bb.head.parameters())
    for path, bn in norms.items():  # a frozen BatchNorm kept its statistics; a trainable one updated them
        assert torch.equal(bn.running_mean, stats[path]) == (not bn.weight.requires_grad), path


def test_inception_keeps_aux_head_where_it_fits_and_drops_it_below():
    assert models.build(cell("inception_v3", resolution=299), 10).head_paths == ("fc", "AuxLogits.fc")
    small = models.build(cell("inception_v3", resolution=75), 10)
    assert small.head_paths == ("fc",) and small.model.AuxLogits is None and small.model.aux_logits is False


# --- heads ---------------------------------------------------------------------------------------------------------


def test_head_paths_found_by_diffing_class_counts():
    assert models._head_paths("tv:resnet18") == ("fc",)
    assert models._head_paths("tv:vit_b_16") == ("heads.head",)
    assert models._head_paths("tv:squeezenet1_0") == ("classifier.1",)
    assert models._head_paths("tv:inception_v3") == ("fc", "AuxLogits.fc")
    assert models._head_paths("tv:googlenet") == ("fc", "aux1.fc2", "aux2.fc2")


def test_mlp_head_recipe_and_linear_dropout():
    mlp = models.build(cell("resnet18", head="mlp", head_hidden=64, head_bn=True, head_dropout=0.3), 5).head
    assert [type(m) for m in mlp] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout, nn.Linear]
    assert (mlp[0].in_features, mlp[0].out_features, mlp[3].p, mlp[4].out_features) == (512, 64, 0.3, 5)
    plain = models.build(cell("resnet18", head="mlp", head_hidden=64), 5).head
    assert [type(m) for m in plain] == [nn.Linear, nn.ReLU, nn.Linear]
    linear = models.build(cell("resnet18", head_dropout=0.2), 5).head
    assert [type(m) for m in linear] == [nn.Dropout, nn.Linear]
    assert isinstance(models.build(cell("resnet18"), 5).head, nn.Linear)


def test_squeezenet_conv_head_gets_a_conv_mlp():
    bb = models.build(cell("squeezenet1_1", resolution=32, head="mlp", head_hidden=32, head_bn=True), 7)
    assert [type(m) for m in bb.head] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
    assert bb.model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_pinned_batchnorm_survives_copy_and_pickle():
    bb = models.build(cell("resnet18", freeze="all"), 10)
    for model in (copy.deepcopy(bb.model), pickle.loads(pickle.dumps(bb.model))):
        model.train()
        assert not model.bn1.training and model.fc.training


def test_integer_freeze_larger_than_depth_trains_everything():
    bb = models.build(cell("resnet18", freeze=10_000), 10)
    assert bb.frozen_layers == 0 and bb.trainable_params == bb.total_params
    last3 = models.build(cell("resnet18", freeze=3), 10)
    assert last3.frozen_layers == last3.total_layers - 3


# --- resolution and FLOPs --------------------------------------------------------------------------------------------


def test_resolution_limits_and_messages():
    with pytest.raises(ResolutionError, match=r"inception_v3 cannot take 32 px: it needs at least 75 px \(native 299\)"):
        models.check_resolution("inception_v3", 32)
    with pytest.raises(ResolutionError, match="tv:vit_b_16 cannot take 128 px: it takes only its native 224 px"):
        models.check_resolution("vit_b_16", 128)
    with pytest.raises(ResolutionError, match="maxvit_t cannot take 256 px: its forward pass fails"):
        models.check_resolution("maxvit_t", 256)
    models.check_resolution("resnet18", 32)
    models.check_resolution("inception_v3", 75)
    with pytest.raises(ResolutionError):
        models.build(cell("vit_b_16", resolution=32), 10)


def test_architecture_follows_the_weights():
    assert models.info("vit_h_14").native_resolution == 518  # SWAG weights: a 518 px network
    models.check_resolution("vit_h_14", 518)
    models.check_resolution("vit_b_16", 384, weights="IMAGENET1K_SWAG_E2E_V1")
    with pytest.raises(ResolutionError, match="only its native 384 px"):
        models.check_resolution("vit_b_16", 224, weights="IMAGENET1K_SWAG_E2E_V1")


def test_flops_count_the_installed_head():
    resnet18_1000 = models.flops_per_image("resnet18", 224, num_classes=1000)
    assert abs(resnet18_1000 - 3.64e9) / 3.64e9 < 0.01  # 1.82 GMACs, the published figure
    assert resnet18_1000 - models.flops_per_image("resnet18", 224, num_classes=10) == 2 * 512 * 990
    assert models.flops_per_image("resnet18", 112) < models.flops_per_image("resnet18", 224) / 3
    with pytest.raises(ResolutionError):
        models.flops_per_image("vit_b_16", 128)


# --- registry ------------------------------------------------------------------------------------------------------


def test_registry_names_globs_and_close_matches():
    assert len(TV_MODELS) == len(torchvision.models.list_models(module=torchvision.models))
    assert TV_MODELS == sorted(TV_MODELS) and all(n.startswith("tv:") for n in TV_MODELS)
    assert models.resolve("resnet18") == models.resolve("tv:resnet18") == ["tv:resnet18"]
    assert models.resolve("resnet1*") == ["tv:resnet101", "tv:resnet152", "tv:resnet18"]
    with pytest.raises(UnknownModelError, match="did you mean: resnet18"):
        models.resolve("resnet19")
    with pytest.raises(UnknownModelError, match="matches no torchvision classifier"):
        models.resolve("nothing_like_it*")
    with pytest.raises(UnknownModelError, match="unknown prefix"):
        models.resolve("hf:resnet18")
    with pytest.raises(UnknownModelError, match="is a pattern matching 3 models; name one"):
        models.info("resnet1*")


def test_timm_names_without_timm_name_the_extra(monkeypatch):
    monkeypatch.setattr(registry, "_timm", lambda: None)
    registry._names.cache_clear()
    try:
        with pytest.raises(UnknownModelError, match=r"pip install 'bench\[timm\]'"):
            models.resolve("timm:xception41")
        assert all(n.startswith("tv:") for n in models.list_models())
    finally:
        registry._names.cache_clear()


def test_unknown_weights_list_the_valid_ones():
    with pytest.raises(UnknownModelError, match="IMAGENET1K_V1, IMAGENET1K_V2"):
        models.build(cell("resnet50", pretrained=True, weights="IMAGENET1K_V3"), 10)


# --- weights, offline ----------------------------------------------------------------------------------------------


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # torch.hub.set_dir() state: get_dir() follows TORCH_HOME again
    assert Path(torch.hub.get_dir()) == tmp_path / "hub"
    return tmp_path / "hub" / "checkpoints"


def test_pretrained_weights_load_from_the_torch_cache(torch_home):
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    torch_home.mkdir(parents=True)
    reference = torchvision.models.resnet18()  # random values under torchvision's own file name
    torch.save(reference.state_dict(), torch_home / Path(urlparse(url).path).name)
    bb = models.build(cell("resnet18", pretrained=True, freeze="all"), 10)
    assert bb.weights == "IMAGENET1K_V1"
    state = bb.model.state_dict()
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(state[key], value), key
    assert bb.head[-1].out_features == 10 and bb.trainable_params == 512 * 10 + 10  # a BatchNorm (no params) first


def test_fetch_weights_returns_the_cached_file_without_downloading(torch_home, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded a cached file"))
    torch_home.mkdir(parents=True)
    (torch_home / "resnet50-11ad3fa6.pth").write_bytes(b"")
    assert models.fetch_weights("resnet50") == torch_home / "resnet50-11ad3fa6.pth"  # default: IMAGENET1K_V2
    with pytest.raises(UnknownModelError, match="valid weights are"):
        models.fetch_weights("resnet50", "IMAGENET1K_V9")


def test_missing_weights_fail_fast_in_one_sentence(torch_home, monkeypatch):
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers: a dead network
    port = silent.getsockname()[1]
    real_urlopen = urllib.request.urlopen
    silent_url = f"http://127.0.0.1:{port}/resnet18-f37072fd.pth"
    monkeypatch.setattr(torch.hub, "urlopen", lambda request, *a, **k: real_urlopen(silent_url, *a, **k))
    monkeypatch.setattr(weights, "DOWNLOAD_TIMEOUT_S", 0.5)
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as caught:
        models.build(cell("resnet18", pretrained=True), 10)
    silent.close()
    assert time.monotonic() - start < 10
    message = str(caught.value)
    assert "resnet18-f37072fd.pth" in message and str(torch_home) in message and "bench fetch tv:resnet18" in message
    assert "\n" not in message and ". " not in message
    assert not list(torch_home.glob("*"))  # nothing half-written left behind


# --- timm (optional) -----------------------------------------------------------------------------------------------


def test_timm_resnet_builds_and_freezes():
    pytest.importorskip("timm")
    assert models.resolve("timm:xception4*") == ["timm:xception41", "timm:xception41p"]
    bb = models.build(cell("timm:resnet18", resolution=32, freeze=3), 10)
    assert bb.head_paths == ("fc",) and bb.head.out_features == 10
    check_freeze(bb, 3)
    check_batchnorm(bb)
    assert bb.model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_timm_xception_from_a_pattern():
    pytest.importorskip("timm")
    (name,) = models.resolve("timm:xception41")
    i = models.info(name)
    assert i.source == "timm" and i.native_resolution == 299 and i.default_weights and not i.fixed_resolution
    with models.meta_init():
        bb = models.build(cell(name, resolution=64, freeze="all", head="mlp"), 10)
    check_freeze(bb, "all")
    check_batchnorm(bb)
    assert bb.head[-1].out_features == 10


def test_timm_vit_is_fixed_and_tags_go_in_weights():
    pytest.importorskip("timm")
    with pytest.raises(ResolutionError, match="only its native 224 px"):
        models.check_resolution("timm:vit_tiny_patch16_224", 160)
    with pytest.raises(UnknownModelError, match="weights: a1_in1k"):
        models.resolve("timm:resnet18.a1_in1k")
    with pytest.raises(UnknownModelError, match="valid weights are .*tv_in1k"):
        models.build(cell("timm:resnet18", pretrained=True, weights="nope"), 10)


@pytest.mark.parametrize("offline", [True, False])
def test_timm_missing_weights_name_the_hf_cache(tmp_path, monkeypatch, offline):
    pytest.importorskip("timm")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # online, but nothing listens: refused at once
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as caught:
        models.build(cell("timm:resnet18", pretrained=True, resolution=32), 10)
    assert time.monotonic() - start < 10  # huggingface_hub alone would retry for about 50 s
    message = str(caught.value)
    assert "models--timm--resnet18.a1_in1k" in message and str(tmp_path) in message and "\n" not in message


def test_timm_pretrained_weights_load_from_the_hf_cache(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "models--timm--resnet18.a1_in1k"  # huggingface_hub's cache layout: refs -> snapshot
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    reference = timm.create_model("resnet18", pretrained=False)
    safetensors_torch.save_file(reference.state_dict(), repo / "snapshots" / ("0" * 40) / "model.safetensors")
    bb = models.build(cell("timm:resnet18", pretrained=True, resolution=32, freeze="all"), 10)
    assert bb.weights == "a1_in1k" and bb.head[-1].out_features == 10
    assert torch.equal(bb.model.conv1.weight, reference.conv1.weight)
    assert models.fetch_weights("timm:resnet18") == repo
