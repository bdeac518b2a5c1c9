"""The learning-rate range test (Smith, "Cyclical Learning Rates for Training Neural Networks",
2017; fastai's `lr_find`): `lr: find` in params.yaml runs it before training, per mode.

The lr grows exponentially from `start` to `end`, one training step at each value, on the
training split, from the weights training will start from; the sweep stops early once the loss
diverges (its smoothed value four times its lowest). The rule for the pick: a tenth of the lr at
which the smoothed loss was lowest (fastai's "minimum / 10"): the lowest point is already past
the steepest descent and close to where training blows up, so a tenth of it trains fast and
stays stable. The weights and torch's CPU generator are put back afterwards, and the sweep draws
its batches from a loader of its own, so that the run that follows starts as it would have with
that lr given by hand (on a GPU the device's generator moves too: resume saves it anyway). The sweep and the
pick are recorded in the train report and drawn; they are cached under everything the sweep
depends on, so an unchanged re-run does not repeat it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from transferlab.errors import warn
from transferlab.files import read_json, write_json

START, END, STEPS = 1e-7, 10.0, 100
SMOOTHING = 0.98   # an exponential moving average of the loss, debiased: one step's noise is no trend
RULE = "a tenth of the lr at the lowest smoothed loss, after the first tenth of the steps"
DIVERGED = 4.0     # the smoothed loss this many times its lowest: the sweep has gone past usefulness


def lr_schedule(start: float = START, end: float = END, steps: int = STEPS) -> list[float]:
    """The sweep's learning rates: `steps` values, evenly spaced in log lr."""
    ratio = (end / start) ** (1 / max(steps - 1, 1))
    return [start * ratio ** i for i in range(steps)]


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """The debiased exponential moving average of the losses, step by step."""
    average, out = 0.0, []
    for i, loss in enumerate(losses, 1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** i))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> float:
    """The pick: a tenth of the lr at the lowest smoothed loss, after the average's first tenth of
    the sweep's steps: there it averages a handful of batches, and on a flat sweep (random weights,
    whose loss no single step at any lr lowers) one lucky first batch would be the "lowest"."""
    skip = STEPS // 10 if len(smoothed) > 2 * (STEPS // 10) else 0  # a short sweep (it diverged): all of it
    lowest = min(range(skip, len(smoothed)), key=smoothed.__getitem__)
    return lrs[lowest] / 10


def sweep(step: Callable[[float], float], lrs: list[float]) -> dict:
    """Run `step(lr)` (one training step at that lr, returning its loss) for each lr until the loss
    diverges; the lrs tried, the raw and smoothed losses, and the pick."""
    tried, losses, smoothed = [], [], []
    for lr in lrs:
        loss = step(lr)
        if not math.isfinite(loss):
            break
        tried.append(lr)
        losses.append(loss)
        smoothed = smooth(losses)
        if len(smoothed) > 5 and smoothed[-1] > DIVERGED * min(smoothed):
            break
    if len(tried) < 5:
        raise ValueError(f"the lr range test diverged within {len(tried)} steps from lr {lrs[0]:g}: start lower")
    return {"lrs": tried, "losses": losses, "smoothed": smoothed, "suggestion": suggest(tried, smoothed),
            "rule": RULE, "stopped_early": len(tried) < len(lrs)}


def range_test(model: nn.Module, batches: Callable[[], Iterable],
               make_optimizer: Callable[[float], torch.optim.Optimizer],
               loss_of: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor], steps: int = STEPS) -> dict:
    """Smith's sweep on `model` (left as it was found): one step per lr on the batches `batches()`
    yields, taken again from the start as often as the sweep needs (give it batches of its own,
    whose draws are not the training loader's). `make_optimizer(lr)` builds the optimizer
    training would use; every group's lr is scaled alike (discriminative learning rates keep
    their ratio)."""
    weights = copy.deepcopy(model.state_dict())
    generators = torch.random.get_rng_state()
    optimizer = make_optimizer(1.0)
    base = [group["lr"] for group in optimizer.param_groups]
    stream = _cycle(batches)

    def step(lr: float) -> float:
        for group, scale in zip(optimizer.param_groups, base):
            group["lr"] = lr * scale
        images, targets = next(stream)
        loss = loss_of(model, images, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())
    try:
        return sweep(step, lr_schedule(steps=steps))
    finally:
        model.load_state_dict(weights)
        torch.random.set_rng_state(generators)


def _cycle(batches: Callable[[], Iterable]):
    while True:
        empty = True
        for images, targets in batches():
            if len(targets):
                empty = False
                yield images, targets
        if empty:
            raise ValueError("the lr range test found no training batches")


def cached_range_test(cache_dir: str | Path, identity: list, run: Callable[[], dict]) -> dict:
    """`run()`'s result, cached under `identity` (model, mode, train params but lr, data, seed):
    an unchanged re-run reads it back; a damaged cache file is measured again with a warning."""
    # The rule is part of the key: a sweep cached under another rule holds another pick.
    key = hashlib.sha256(json.dumps([RULE, *identity], sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = Path(cache_dir) / "lr_find" / f"lr-find-{key}.json"
    if path.exists():
        try:
            cached = read_json(path)
            if cached["suggestion"] > 0 and len(cached["lrs"]) == len(cached["smoothed"]):
                return {**cached, "cached": True}
        except (OSError, ValueError, KeyError, TypeError) as err:
            warn(f"{path}: unreadable ({err}); running the lr range test again")
    found = run()
    write_json(path, found)
    return {**found, "cached": False}
