"""scoring.py: a split scored as evaluate scores the test split."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from conftest import CLASS_COLORS, make_image
from PIL import Image
from torch import nn

from transferlab import scoring
from transferlab.data import ImageSource, build_transform
from transferlab.engine import predict
from transferlab.hardware import pick_hardware
from transferlab.images import Sample
from transferlab.models import Preprocess
from transferlab.params import TTA_VIEWS
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


def scored(model, test_split, tmp_path, tensor_batches: bool, views=None):
    """`model`'s predictions on the split through predict_split (its default views if None)."""
    samples, source = test_split
    hw = pick_hardware("cpu", "fp32", False, 0, False, tensor_batches)
    chosen = {} if views is None else {"views": views}
    return predict_split(model, "tiny", PRE, CLASSES, samples, source, 4, hw, tmp_path / "cache", "test",
                         **chosen)[0]


@pytest.mark.parametrize("tensor_batches", [True, False])
def test_center_alone_is_the_unaugmented_prediction_exactly(test_split, tmp_path, tensor_batches):
    """evaluate.tta: [center], the default, scores as evaluate did before TTA: the plain pass."""
    torch.manual_seed(0)
    model, (samples, source) = Recording([]), test_split
    hw = pick_hardware("cpu", "fp32", False, 0, False, tensor_batches)
    plain = predict(model, source.batches(samples, CLASSES, PRE, 4, False, 0, hw), hw)
    for views in (None, ("center",)):
        predictions = scored(model, test_split, tmp_path, tensor_batches, views)
        assert (predictions.probs == plain.probs).all() and (predictions.targets == plain.targets).all()
        assert predictions.stats.loss == plain.stats.loss


@pytest.mark.parametrize("tensor_batches", [True, False])
def test_tta_is_the_mean_of_the_softmaxes_of_the_centre_crop_and_its_mirror(test_split, tmp_path,
                                                                            tensor_batches):
    """[center, hflip]: the mean of the model's softmax on each centre crop and on that crop
    mirrored, made here image by image (torchvision's PIL transforms, and their PIL mirror, for the
    DataLoader path; the tensor path's own centre crop, mirrored, for tensor batches); the loss is
    that mean's."""
    torch.manual_seed(0)
    model, (samples, source) = Recording([]).eval(), test_split
    crops = centre_crops(samples, source, tensor_batches)
    with torch.no_grad():
        softmax = [model(views).double().softmax(1) for views in (crops, crops.flip(-1))]
    if not tensor_batches:  # the mirror is the PIL crop flipped, not some other crop
        assert torch.equal(crops.flip(-1), centre_crops(samples, source, False, mirrored=True))
    expected = ((softmax[0] + softmax[1]) / 2).numpy()
    assert not torch.allclose(softmax[0], softmax[1])  # the model is not symmetric: the mirror counts
    predictions = scored(model, test_split, tmp_path, tensor_batches, ("center", "hflip"))
    assert np.allclose(predictions.probs, expected, rtol=0, atol=1e-6)
    targets = [CLASSES.index(s.label) for s in samples]
    assert predictions.targets.tolist() == targets
    loss = -np.log(expected[np.arange(len(samples)), targets]).mean()
    assert predictions.stats.loss == pytest.approx(loss, rel=1e-6)
    assert predictions.stats.images == len(samples)


def centre_crops(samples, source, tensor_batches: bool, mirrored: bool = False) -> torch.Tensor:
    """The split's normalised centre crops (mirrored: flipped as PIL images), one image at a time."""
    if tensor_batches:
        hw = pick_hardware("cpu", "fp32", False, 0, False, True)
        batches = source.batches(samples, CLASSES, PRE, len(samples), False, 0, hw)
        return torch.cat([batches.batch(torch.tensor([row]), [None], [False]) for row in range(len(samples))])
    steps = build_transform(PRE, train=False).transforms  # Resize, CenterCrop, ToTensor, Normalize
    transform = T.Compose(steps[:2] + ([TF.hflip] if mirrored else []) + steps[2:])
    return torch.stack([transform(Image.fromarray(source.store.image(source.store.slot(s), s.path)))
                        for s in samples])


def test_every_view_params_accepts_is_made_here():
    assert tuple(scoring.VIEWS) == TTA_VIEWS
