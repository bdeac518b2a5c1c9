"""Scoring a model on a split as evaluate scores the test split: unaugmented, or averaged over
evaluate.tta's test-time views, at evaluate's precision and layout, in exact fp32 arithmetic where
fp32 is asked for. The learning curve's points score through the same code (one question, one
answer), without importing what only evaluate's metrics need."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from transferlab.data import ImageSource
from transferlab.engine import EpochStats, Predictions, predict, split_outputs
from transferlab.hardware import Hardware, Workload, decide, pick_hardware
from transferlab.images import Sample
from transferlab.models import Preprocess
from transferlab.params import EvaluateParams

# What scoring sets, and reports/eval.json records: no TF32 (on an Ampere or newer GPU, cuDNN's
# fp32 convolutions would otherwise run in TF32, a 10-bit mantissa, by torch's default), and no
# cuDNN autotuning, whose choice of algorithm may differ from one run to the next.
SCORING_MATH = {"tf32": False, "cudnn_benchmark": False}

# evaluate.tta's views (params.TTA_VIEWS), each made from a batch of the resize + centre crop as
# either input path (tensor batches, the DataLoader) gives it, so both get the same views:
# normalisation is per channel, so mirroring the normalised crop mirrors the crop.
VIEWS = {"center": lambda images: images, "hflip": lambda images: images.flip(-1)}


def scoring_hardware(evaluate: EvaluateParams) -> Hardware:
    """The device, precision and layout a split is scored at (auto ones measured by predict_split)."""
    return pick_hardware(precision=evaluate.precision, channels_last=evaluate.channels_last)


@contextlib.contextmanager
def exact_math():
    """torch's global switches at SCORING_MATH while scoring; as they were afterwards."""
    switches = [(torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"),
                (torch.backends.cudnn, "benchmark")]
    before = [getattr(owner, name) for owner, name in switches]
    for owner, name in switches:
        setattr(owner, name, False)
    try:
        yield
    finally:
        for (owner, name), value in zip(switches, before):
            setattr(owner, name, value)


def predict_split(model, arch: str, pre: Preprocess, classes: list[str], samples: list[Sample],
                  source: ImageSource, batch_size: int, hw: Hardware, cache_dir: Path,
                  desc: str, views: tuple[str, ...] = ("center",)) -> tuple[Predictions, Hardware]:
    """`model`'s class probabilities for `samples`, the mean over `views` (evaluate.tta), and the
    hardware it ran at (on an accelerator in passes of hw.inference_images: a small batch keeps a
    GPU launch-bound)."""
    batch_size = max(batch_size, hw.inference_images)
    work = Workload(model, pre.crop_size, 0, len(samples), batch_size, batch_size)
    with exact_math():
        hw = decide(hw, work, cache_dir, [arch, "inference"])
        hw.prepare(model)
        warm_up(model, hw, work)
        batches = source.batches(samples, classes, pre, batch_size, False, 0, hw)
        return predict_views(model, batches, hw, views, desc), hw


def predict_views(model, batches, hw: Hardware, views: tuple[str, ...], desc: str) -> Predictions:
    """The mean of the softmax probabilities over `views` (fastai's and timm's TTA), and the loss
    and accuracy of that mean; one view is engine.predict's answer as it stands."""
    if len(views) == 1:
        return predict(model, ViewOf(batches, VIEWS[views[0]]), hw, desc=desc)
    each = [predict(model, ViewOf(batches, VIEWS[view]), hw, desc=f"{desc} {view}") for view in views]
    probs, targets = np.mean([p.probs for p in each], axis=0), each[0].targets
    n = len(targets)
    # -log p(true class) of the mean; floored because float64 rounds the softmax of a logit far
    # below the others to 0 in every view, and the loss should stay a (large) number, not inf.
    loss = float(-np.log(np.maximum(probs[np.arange(n), targets], 1e-300)).mean()) if n else 0.0
    accuracy = float((probs.argmax(1) == targets).mean()) if n else 0.0
    # Test images per second, every view's pass counted: what scoring one image costs.
    return Predictions(probs, targets, EpochStats(loss, accuracy, n, sum(p.stats.seconds for p in each)))


class ViewOf:
    """The batches of `batches` (re-iterable, as a DataLoader or TensorBatches is) made into one view."""

    def __init__(self, batches, view):
        self.batches, self.view = batches, view

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for images, targets in self.batches:
            yield self.view(images), targets


@torch.no_grad()
def warm_up(model, hw: Hardware, work: Workload) -> None:
    """Every batch shape the split meets (the full batch, the tail), once and untimed, so that the
    images/s predict reports pays no first call (kernel loading, a new shape's plans): the first
    model scored would pay them alone. Ends once the device has done the work."""
    model.eval()
    for size, _ in work.shapes():
        with hw.autocast():
            logits, _ = split_outputs(model(hw.to_device(torch.zeros(size, 3, work.crop_size, work.crop_size))))
        logits.cpu()
