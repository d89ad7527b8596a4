"""The training loop honours every option it records: schedule, precision, memory format,
freezing, early stop, feature caching, throughput mode."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from bench import data, models, train
from bench.suite import Cell

CPU = torch.device("cpu")
SMALL = dict(dataset="synthetic", resolution=32, batch_size=16, train_subset=96, test_subset=48, pretrained=False)


def run(cell: Cell, events: list | None = None):
    splits = data.load_splits(cell.dataset, val_fraction=cell.val_fraction, train_subset=cell.train_subset,
                              test_subset=cell.test_subset)
    torch.manual_seed(cell.seed)  # as the worker does: the new head's initialisation is reproducible
    backbone = models.build(cell, len(splits.classes))
    outcome = train.run_cell(cell, splits, backbone, CPU, len(splits.classes), (events if events is not None else []).append)
    return backbone, outcome


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine():
    plan = train.Plan(precision="fp32", lr=0.1, steps_per_epoch=10, total_steps=110, warmup_steps=10)
    assert [train.lr_factor(s, plan, "cosine") for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert train.lr_factor(10, plan, "cosine") == pytest.approx(1.0)
    assert train.lr_factor(60, plan, "cosine") == pytest.approx(0.5)
    assert train.lr_factor(110, plan, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert train.lr_factor(60, plan, "constant") == 1.0


def test_optimizer_sees_the_schedule_and_decays_only_weights():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    cell = Cell(model="m", lr=0.2, weight_decay=0.01, warmup_fraction=0.0)
    plan = train.make_plan(cell, steps_per_epoch=4, device=CPU)
    opt, sched = train.make_optimizer(model, cell, plan)
    decay, no_decay = opt.param_groups
    assert all(p.ndim > 1 for p in decay["params"]) and decay["weight_decay"] == 0.01
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert opt.defaults["nesterov"] is True
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])


def test_default_lr_follows_the_documented_rules():
    assert train.default_lr(Cell(model="m")) == 0.01
    assert train.default_lr(Cell(model="m", freeze="all")) == pytest.approx(0.1)
    assert train.default_lr(Cell(model="m", pretrained=False)) == pytest.approx(0.05)
    assert train.default_lr(Cell(model="m", optimizer="adamw")) == 1e-3
    assert train.default_lr(Cell(model="m", lr=0.3)) == 0.3


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_activations_use_the_requested_precision(precision, dtype):
    cell = Cell(model="tv:resnet18", precision=precision, steps=1, **SMALL)
    seen = []
    splits = data.load_splits("synthetic", train_subset=32, test_subset=16)
    backbone = models.build(cell, 10)
    backbone.model.layer1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    _, outcome = None, train.run_cell(cell, splits, backbone, CPU, 10, lambda e: None)
    assert outcome.row["precision"] == precision and seen[0] == dtype


def test_auto_precision_is_fp32_on_the_cpu():
    assert train.resolve_precision(Cell(model="m"), CPU) == "fp32"


@pytest.mark.parametrize("channels_last", [True, False])
def test_memory_format_is_honoured(channels_last):
    cell = Cell(model="tv:resnet18", channels_last=channels_last, steps=1, **SMALL)
    seen = []
    splits = data.load_splits("synthetic", train_subset=32, test_subset=16)
    backbone = models.build(cell, 10)
    backbone.model.conv1.register_forward_pre_hook(lambda m, i: seen.append(i[0].is_contiguous(memory_format=torch.channels_last)))
    train.run_cell(cell, splits, backbone, CPU, 10, lambda e: None)
    assert seen[0] is channels_last
    assert backbone.model.conv1.weight.is_contiguous(memory_format=torch.channels_last) is channels_last


def test_frozen_parameters_and_bn_statistics_do_not_move():
    cell = Cell(model="tv:resnet18", freeze=0.5, steps=3, **SMALL)
    splits = data.load_splits("synthetic", train_subset=64, test_subset=16)
    backbone = models.build(cell, 10)
    before = {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}
    frozen = {n for n, p in backbone.model.named_parameters() if not p.requires_grad}
    assert frozen and len(frozen) < len(before)
    train.run_cell(cell, splits, backbone, CPU, 10, lambda e: None)
    after = backbone.model.state_dict()
    for name in frozen:
        assert torch.equal(before[name], after[name]), name
    assert torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])  # bn1 sits in the frozen half
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    assert not torch.equal(before["layer4.1.bn2.running_mean"], after["layer4.1.bn2.running_mean"])


def test_early_stop_at_the_target_accuracy():
    cell = Cell(model="tv:resnet18", epochs=4, target_top1=0.01, **SMALL)
    _, outcome = run(cell)
    assert outcome.row["epochs_run"] == 1 and outcome.row["target_reached"] is True
    assert 0 < outcome.row["time_to_target_s"] <= outcome.row["train_s"]
    assert len(outcome.epochs) == 1


def test_without_target_all_epochs_run_and_metrics_are_recorded():
    cell = Cell(model="tv:resnet18", epochs=2, **SMALL)
    events = []
    _, outcome = run(cell, events)
    row = outcome.row
    assert row["epochs_run"] == 2 and row["target_reached"] is None and len(outcome.epochs) == 2
    assert 0 <= row["top1"] <= row["top5"] <= 1
    assert len(row["confusion_matrix"]) == 10 and sum(map(sum, row["confusion_matrix"])) == 48
    assert row["images_per_s"] > 0 and row["warmup_s"] < row["train_s"]
    assert [e["kind"] for e in events if e["kind"] != "step"] == ["start", "epoch", "epoch"]


def test_steps_cap_training():
    cell = Cell(model="tv:resnet18", epochs=3, steps=4, **SMALL)
    _, outcome = run(cell)
    assert outcome.row["steps_run"] == 4


def test_feature_cache_matches_end_to_end_linear_probe():
    """With augmentation off and a frozen backbone, training the head on cached features sees the same
    inputs in the same order as training end to end: the results agree, one backbone pass instead of many."""
    common = dict(model="tv:resnet18", freeze="all", augment="none", epochs=2, val_fraction=0.0, **SMALL)
    _, cached = run(Cell(feature_cache="auto", **common))
    _, direct = run(Cell(feature_cache="off", **common))
    assert cached.row["feature_cache_used"] is True and direct.row["feature_cache_used"] is False
    assert cached.row["top1"] == pytest.approx(direct.row["top1"], abs=0.03)
    assert cached.epochs[-1]["train_loss"] == pytest.approx(direct.epochs[-1]["train_loss"], rel=1e-3)


def _as_if_trained(model: torch.nn.Module) -> None:
    # ConvNeXt starts its residual branches at 1e-6 (layer scale), so at random init stochastic depth changes
    # nothing measurable; trained weights have branches that matter, as here.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layer_scale"):
                param.fill_(1.0)


@pytest.mark.parametrize("model", ["tv:convnext_tiny", "tv:vgg11"])
def test_frozen_dropout_and_stochastic_depth_rest_so_both_probes_agree(model):
    """Frozen means frozen: stochastic depth and dropout inside a frozen backbone (ConvNeXt's blocks, VGG's
    classifier block) run in eval mode, so a linear probe trained end to end sees the same features as one
    trained on cached features, and both learn the same head."""
    common = dict(model=model, freeze="all", augment="none", epochs=2, val_fraction=0.0, **SMALL)
    heads, rows = [], []
    for cache in ("auto", "off"):
        cell = Cell(feature_cache=cache, **common)
        splits = data.load_splits(cell.dataset, val_fraction=0.0, train_subset=cell.train_subset,
                                  test_subset=cell.test_subset)
        torch.manual_seed(cell.seed)
        backbone = models.build(cell, len(splits.classes))
        _as_if_trained(backbone.model)
        rows.append(train.run_cell(cell, splits, backbone, CPU, len(splits.classes), lambda e: None).row)
        heads.append(backbone.head.state_dict())
        resting = [m for m in backbone.model.modules() if type(m).__name__ in ("Dropout", "StochasticDepth")]
        assert resting and not any(m.training for m in resting)
    cached, direct = rows
    assert cached["feature_cache_used"] is True and direct["feature_cache_used"] is False
    assert cached["top1"] == direct["top1"]
    for name, weight in heads[0].items():
        assert torch.allclose(weight, heads[1][name], atol=1e-4, rtol=1e-3), name


def test_frozen_blocks_stay_in_eval_across_train_and_partial_freezes_keep_training():
    bb = models.build(Cell(model="tv:convnext_tiny", freeze=0.5, **SMALL), 10)
    bb.model.train()
    depth = {n: m.training for n, m in bb.model.named_modules() if type(m).__name__ == "StochasticDepth"}
    frozen_stage, trained_stage = "features.1.0.stochastic_depth", "features.7.2.stochastic_depth"
    assert depth[frozen_stage] is False and depth[trained_stage] is True
    bb.model.eval()
    bb.model.train()  # evaluation and back, as every epoch does
    assert bb.model.get_submodule(frozen_stage).training is False
    assert bb.model.get_submodule("features.0").training is False and bb.head.training is True


def test_throughput_mode_times_steps_without_evaluating():
    cell = Cell(model="tv:resnet18", mode="throughput", throughput_warmup_steps=2, throughput_steps=3, **SMALL)
    _, outcome = run(cell)
    row = outcome.row
    assert row["steps_run"] == 5 and row["images_per_s"] > 0 and row["top1"] is None


@pytest.mark.slow
def test_compile_runs_the_compiled_graph_and_keeps_compilation_out_of_the_steady_state():
    # About a minute on two CPU cores (inductor compiles ResNet-18's forward and backward).
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cell = Cell(model="tv:resnet18", mode="throughput", compile=True, throughput_warmup_steps=1, throughput_steps=3,
                **{**SMALL, "batch_size": 8})
    _, outcome = run(cell)
    row = outcome.row
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the step ran through dynamo
    steady_step_s = (row["train_s"] - row["warmup_s"]) / cell.throughput_steps
    assert row["warmup_s"] > 5 * steady_step_s and row["images_per_s"] > 0


def test_auxiliary_heads_add_their_loss():
    y = torch.tensor([0, 1])
    main, aux = torch.randn(2, 3), torch.randn(2, 3)
    plain, _ = train.classification_loss(main, y, 0.0)
    both, logits = train.classification_loss((main, aux), y, 0.0)
    expected = plain + 0.4 * torch.nn.functional.cross_entropy(aux, y)
    assert torch.allclose(both, expected) and logits is main


def test_evaluation_runs_in_eval_mode_and_restores_the_mode():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3), torch.nn.Dropout(0.9), torch.nn.BatchNorm1d(3))
    batches = [(torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,))) for _ in range(3)]
    net.train()
    stats = net[3].running_mean.clone()
    first = train.evaluate(net, batches, 3, "fp32", CPU)
    second = train.evaluate(net, batches, 3, "fp32", CPU)
    assert first["loss"] == second["loss"] and torch.equal(first["confusion"], second["confusion"])
    assert net.training and torch.equal(net[3].running_mean, stats)  # no BN statistics moved


def test_fp16_uses_a_gradient_scaler_and_others_do_not():
    model = torch.nn.Linear(4, 2)
    for precision, enabled in (("fp16", True), ("bf16", False), ("fp32", False)):
        cell = Cell(model="m", precision=precision)
        stepper = train.Stepper(model, cell, train.make_plan(cell, 4, CPU), CPU)
        assert stepper.scaler.is_enabled() is enabled, precision


@pytest.mark.gpu
def test_a_cell_on_the_gpu_records_vram_and_bf16():
    cuda = torch.device("cuda:0")
    cell = Cell(model="tv:resnet18", steps=3, **SMALL)
    splits = data.load_splits("synthetic", train_subset=64, test_subset=32)
    from bench import measure

    measure.reset_vram(cuda)
    outcome = train.run_cell(cell, splits, models.build(cell, 10), cuda, 10, lambda e: None)
    assert outcome.row["precision"] == "bf16" and outcome.row["top1"] is not None
    assert measure.vram_peaks(cuda)["peak_vram_allocated_bytes"] > 0


def test_test_pass_uses_the_best_validation_epochs_weights(monkeypatch):
    """restore_best (the default): val_top1_best and top1 describe the same weights. Validation is scripted to
    peak at epoch 0, so the test pass must see epoch 0's head, not the last epoch's."""
    fit_module = importlib.import_module("bench.train.fit")  # the package re-exports the function `fit`
    real = fit_module.evaluate
    for restore, expected_epoch in ((True, 0), (False, 2)):
        cell = Cell(model="tv:resnet18", epochs=3, restore_best=restore, **SMALL)
        scripted, snapshots, at_test = iter([0.9, 0.5, 0.4]), [], []
        splits = data.load_splits(cell.dataset, train_subset=cell.train_subset, test_subset=cell.test_subset)
        torch.manual_seed(0)
        backbone = models.build(cell, 10)

        def fake_evaluate(forward, loader, num_classes, precision, device):
            result = real(forward, loader, num_classes, precision, device)
            top1 = next(scripted, None)  # three validation passes, then the test pass
            if top1 is None:
                at_test.append(backbone.model.fc.weight.detach().clone())
            else:
                result["top1"] = top1
            return result

        def on_event(event):
            if event["kind"] == "epoch":
                snapshots.append(backbone.model.fc.weight.detach().clone())

        monkeypatch.setattr(fit_module, "evaluate", fake_evaluate)
        outcome = train.run_cell(cell, splits, backbone, CPU, 10, on_event)
        assert outcome.row["test_epoch"] == expected_epoch and outcome.row["val_top1_best"] == 0.9
        # A config is ranked on the validation score of the weights that were tested, not on the best epoch's.
        assert outcome.row["val_top1_tested"] == [0.9, 0.5, 0.4][expected_epoch]
        assert torch.equal(at_test[0], snapshots[expected_epoch])
        assert not torch.equal(snapshots[0], snapshots[2])


def test_probe_features_are_normalised_so_their_scale_does_not_matter():
    """MAE's linear-probe protocol: a parameter-free BatchNorm before the head. Features 1000x larger (as a
    random-init backbone's can be) train the same probe; without the norm they do not."""
    def losses(probe_norm: str, scale: float) -> list[float]:
        cell = Cell(model="tv:resnet18", freeze="all", augment="none", epochs=2, probe_norm=probe_norm, **SMALL)
        splits = data.load_splits(cell.dataset, train_subset=cell.train_subset, test_subset=cell.test_subset)
        torch.manual_seed(0)
        backbone = models.build(cell, 10)
        backbone.model.avgpool.register_forward_hook(lambda m, i, out: out * scale)
        outcome = train.run_cell(cell, splits, backbone, CPU, 10, lambda e: None)
        return [e["train_loss"] for e in outcome.epochs]

    head = models.build(Cell(model="tv:resnet18", freeze="all", **SMALL), 10).head
    assert isinstance(head[0], torch.nn.BatchNorm1d) and not head[0].affine
    assert losses("batchnorm", 1000.0) == pytest.approx(losses("batchnorm", 1.0), rel=0.05)  # eps: not exact
    unnormalised = losses("none", 1000.0)
    assert unnormalised[-1] > 10 * losses("none", 1.0)[-1]


def test_cached_probe_timing_columns_add_up():
    cell = Cell(model="tv:resnet18", freeze="all", augment="none", epochs=2, **SMALL)
    _, outcome = run(cell)
    row = outcome.row
    assert row["feature_cache_used"] is True and row["images_per_s"] is None
    head_s = sum(e["epoch_s"] for e in outcome.epochs)
    assert row["train_s"] == pytest.approx(row["feature_extract_s"] + head_s)  # the train-split pass is training
    assert row["eval_s"] > 0  # the validation and test passes are evaluation


def test_resident_data_bytes_are_recorded():
    cell = Cell(model="tv:resnet18", steps=2, **SMALL)
    _, outcome = run(cell)
    splits = data.load_splits(cell.dataset, train_subset=cell.train_subset, test_subset=cell.test_subset)
    expected = sum(s.images.nbytes + s.labels.nbytes for s in (splits.train, splits.val, splits.test))
    assert outcome.row["data_device_bytes"] == expected


def test_which_test_images_were_right_is_recorded_bit_packed():
    from bench.train.metrics import unpack_correct

    cell = Cell(model="tv:resnet18", steps=3, **SMALL)
    _, outcome = run(cell)
    row = outcome.row
    right = unpack_correct(row["test_correct"], row_count := sum(sum(r) for r in row["confusion_matrix"]))
    assert len(right) == row_count == 48 and right.mean() == pytest.approx(row["top1"])
    assert len(row["test_correct"]) <= 4 * (48 // 8 + 3) // 3 + 4  # base64 of the packed bits, not a list
