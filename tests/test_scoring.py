"""scoring.py: a split scored as evaluate scores the test split."""
from pathlib import Path

import pytest
import torch
from conftest import CLASS_COLORS, make_image
from torch import nn

from transferlab import scoring
from transferlab.data import ImageSource
from transferlab.engine import predict
from transferlab.hardware import pick_hardware
from transferlab.images import Sample
from transferlab.models import Preprocess
from transferlab.scoring import SCORING_MATH, predict_split
from transferlab.store import open_store

PRE = Preprocess(crop_size=24, resize_size=28, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
CLASSES = list(CLASS_COLORS)
SWITCHES = [(torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"),
            (torch.backends.cudnn, "benchmark")]


class Recording(nn.Module):
    """A tiny classifier that records, per forward, its batch size and torch's TF32 and cuDNN
    autotuning switches (settable on any build, read by CUDA kernels only)."""

    def __init__(self, events: list):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, len(CLASSES)))
        self.events = events

    def forward(self, images):
        self.events.append((len(images), tuple(getattr(owner, name) for owner, name in SWITCHES)))
        return self.net(images)


@pytest.fixture
def switches_on():
    """torch's TF32 and autotuning switches all on (as a GPU run may leave them), then as they were."""
    before = [getattr(owner, name) for owner, name in SWITCHES]
    for owner, name in SWITCHES:
        setattr(owner, name, True)
    yield
    for (owner, name), value in zip(SWITCHES, before):
        setattr(owner, name, value)


@pytest.fixture
def test_split(tmp_path):
    samples = [Sample(str(make_image(tmp_path / f"{c}{i}.png", color, i)), c)
               for c, color in CLASS_COLORS.items() for i in range(3)]
    return samples, ImageSource(open_store(samples, PRE.resize_size, tmp_path / "store"))


def score(model, test_split, cache: Path, monkeypatch) -> list:
    """`model` scored on the split, batches of 4; the forwards it ran, "timed" where predict began."""
    samples, source = test_split
    timed = scoring.predict
    monkeypatch.setattr(scoring, "predict", lambda *args, **kwargs: model.events.append("timed") or timed(
        *args, **kwargs))
    hw = pick_hardware("cpu", "fp32", False, 0, False, True)
    predictions, _ = predict_split(model, "tiny", PRE, CLASSES, samples, source, 4, hw, cache, "test")
    events = list(model.events)
    again = predict(model, source.batches(samples, CLASSES, PRE, 4, False, 0, hw), hw)
    assert (again.probs == predictions.probs).all()  # the warm-up changed nothing
    return events


def test_scoring_is_exact_fp32(test_split, tmp_path, monkeypatch, switches_on):
    """On an Ampere or newer GPU torch's defaults make fp32 convolutions TF32 (a 10-bit mantissa),
    and cuDNN's autotuning may pick another algorithm run after run: scoring turns both off while
    it runs, and puts them back after."""
    events = score(Recording([]), test_split, tmp_path, monkeypatch)
    assert {event[1] for event in events if event != "timed"} == {(False, False, False)}
    assert SCORING_MATH == {"tf32": False, "cudnn_benchmark": False}  # what reports/eval.json records
    assert all(getattr(owner, name) is True for owner, name in SWITCHES)  # as they were


def test_scoring_warms_every_batch_shape_up_before_the_timing(test_split, tmp_path, monkeypatch):
    """With pinned settings nothing else runs the model before evaluate times it: the first mode
    scored would pay the first calls of each shape (kernel loading, cuDNN's plans) alone. The full
    batch and the tail (4 and 2 of 6 images) run once, untimed, first."""
    events = score(Recording([]), test_split, tmp_path, monkeypatch)
    first_timed = events.index("timed")
    assert sorted(size for size, _ in events[:first_timed]) == [2, 4]
    assert [size for size, _ in events[first_timed + 1:]] == [4, 2]
