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
    """Linear probe on cached features: one backbone pass instead of one per epoch.

    The pass over the training split is training time (`train_s`, `feature_extract_s`, and `time_to_target_s`
    include it); the passes over validation and test are evaluation time (`eval_s`). `images_per_s` is left
    empty: head steps on cached features are not a training throughput to compare with anything.
    """
    cell, precision = run.cell, run.plan.precision
    run.clock.lap()
    train = FeatureLoader(*extract_features(model, head, loaders.train, precision, run.device), cell.batch_size,
                          train=True, seed=cell.seed)
    extract_train_s = run.clock.lap()
    val, test = (None if ld is None else FeatureLoader(*extract_features(model, head, ld, precision, run.device),
                                                       cell.batch_size, train=False, seed=cell.seed)
                 for ld in (loaders.val, loaders.test))
    extract_eval_s = run.clock.lap()
    # The cached features are fp32; the head is tiny, so it trains in fp32 whatever the cell says.
    head_run = dataclasses.replace(run, plan=dataclasses.replace(run.plan, precision="fp32"))
    stepper = Stepper(head, cell, head_run.plan, run.device)
    outcome = fit(head_run, stepper, Loaders(train, val, test), head)
    t, reached_s = outcome.training, outcome.accuracy.time_to_target_s
    outcome.training = dataclasses.replace(
        t, train_s=t.train_s + extract_train_s, eval_s=t.eval_s + extract_eval_s, images_per_s=None,
        feature_cache_used=True, feature_extract_s=extract_train_s, precision=precision)
    if reached_s is not None:
        outcome.accuracy = dataclasses.replace(outcome.accuracy, time_to_target_s=reached_s + extract_train_s)
    return outcome
