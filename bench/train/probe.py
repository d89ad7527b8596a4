"""The linear probe on cached features: the frozen backbone runs once over the data, then the head trains on
its features for every epoch (`freeze: all` with `augment: none`)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from bench.loader import EpochBatches
from bench.train.context import CellRun, Loaders, Outcome
from bench.train.fit import fit
from bench.train.step import Stepper, autocast


class FeatureLoader(EpochBatches):
    """Batches of cached backbone features, in the same order the image loader would give them."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, batch_size: int, train: bool, seed: int):
        super().__init__(labels, batch_size, train, seed)
        self.features = features

    def __iter__(self):
        for idx, _ in self.index_batches():
            yield self.features[idx], self.labels[idx]


@torch.inference_mode()
def extract_features(model: nn.Module, head: nn.Module, loader, precision: str, device: torch.device):
    """Run the frozen backbone once; the head's input is the feature vector (a hook catches it)."""
    feats, labels = [], []
    hook = head.register_forward_hook(lambda _m, inputs, _out: feats.append(inputs[0].float().clone()))
    model.eval()
    try:
        for x, y in loader:
            with autocast(precision, device):
                model(x)
            labels.append(y)
    finally:
        hook.remove()
    return torch.cat(feats), torch.cat(labels)


def fit_on_features(run: CellRun, model: nn.Module, head: nn.Module, loaders: Loaders) -> Outcome:
    """Linear probe on cached features: one backbone pass instead of one per epoch."""
    cell, precision = run.cell, run.plan.precision
    cached = []
    for i, ld in enumerate(loaders):
        if ld is None:
            cached.append(None)
            continue
        f, y = extract_features(model, head, ld, precision, run.device)
        cached.append(FeatureLoader(f, y, cell.batch_size, train=i == 0, seed=cell.seed))
    extract_s = run.clock.lap()
    # The cached features are fp32; the head is tiny, so it trains in fp32 whatever the cell says.
    head_run = dataclasses.replace(run, plan=dataclasses.replace(run.plan, precision="fp32"))
    stepper = Stepper(head, cell, head_run.plan, run.device)
    outcome = fit(head_run, stepper, Loaders(*cached), head)
    # The backbone pass is part of what the probe cost: train_s and images/s include it, so a cached
    # probe compares honestly with the same cell trained end to end.
    row = outcome.row
    row["train_s"] += extract_s
    row["images_per_s"] = row["steps_run"] * cell.batch_size / row["train_s"] if row["train_s"] else None
    row.update(feature_cache_used=True, feature_extract_s=extract_s, precision=precision)
    return outcome
