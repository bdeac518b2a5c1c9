"""Scoring a model on a split as evaluate scores the test split: unaugmented, at evaluate's
precision and layout. The learning curve's points score through the same code (one question,
one answer), without importing what only evaluate's metrics need."""
from __future__ import annotations

from pathlib import Path

from transferlab.data import ImageSource
from transferlab.engine import Predictions, predict
from transferlab.hardware import Hardware, Workload, decide, pick_hardware
from transferlab.images import Sample
from transferlab.models import Preprocess
from transferlab.params import EvaluateParams


def scoring_hardware(evaluate: EvaluateParams) -> Hardware:
    """The device, precision and layout a split is scored at (auto ones measured by predict_split)."""
    return pick_hardware(precision=evaluate.precision, channels_last=evaluate.channels_last)


def predict_split(model, arch: str, pre: Preprocess, classes: list[str], samples: list[Sample],
                  source: ImageSource, batch_size: int, hw: Hardware, cache_dir: Path,
                  desc: str) -> tuple[Predictions, Hardware]:
    """`model`'s class probabilities for `samples`, unaugmented, and the hardware it ran at."""
    work = Workload(model, pre.crop_size, 0, len(samples), batch_size, batch_size)
    hw = decide(hw, work, cache_dir, [arch, "inference"])
    hw.prepare(model)
    batches = source.batches(samples, classes, pre, batch_size, False, 0, hw)
    return predict(model, batches, hw, desc=desc), hw
