import math

import numpy as np
import pytest
import torch
from conftest import make_image
from torchvision import transforms as T

from transferlab.data import (
    RATIO,
    SCALE,
    DeviceImages,
    ImageDataset,
    TensorBatches,
    build_transform,
    crop_boxes,
    make_loader,
)
from transferlab.distributed import World
from transferlab.errors import UserError
from transferlab.images import Sample
from transferlab.models import Preprocess
from transferlab.store import open_store

PRE = Preprocess(crop_size=32, resize_size=40, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))


@pytest.fixture
def data(tmp_path):
    samples = [Sample(str(make_image(tmp_path / f"{c}{i}.jpg", (30 + 40 * i, 90, 9), i, (64 + 8 * i, 48))), c)
               for c in "ab" for i in range(3)]
    return samples, open_store(samples, PRE.resize_size, tmp_path / "cache")


def test_dataset_yields_normalised_crops_and_label_indices(data):
    samples, store = data
    for train in (True, False):
        dataset = ImageDataset(samples, ["a", "b"], build_transform(PRE, train), store)
        image, target = dataset[3]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and target == 1
        assert min(dataset.image(0).shape[:2]) == PRE.resize_size
    with pytest.raises(UserError, match="not among the model's classes.*run dvc repro"):
        ImageDataset(samples, ["a"], build_transform(PRE, False), store)


def test_tensor_batches_evaluate_exactly_as_the_torchvision_transforms(data):
    samples, store = data
    reference = make_loader(ImageDataset(samples, ["a", "b"], build_transform(PRE, False), store), 4, False, 0)
    batches = TensorBatches(DeviceImages(store, torch.device("cpu")), samples, ["a", "b"], PRE, 4, train=False)
    assert len(batches) == len(reference) == 2
    for (ours, our_targets), (theirs, their_targets) in zip(batches, reference):
        assert torch.equal(our_targets, their_targets)
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_tensor_batches_train_shapes_determinism_and_flips(data):
    samples, store = data
    images = DeviceImages(store, torch.device("cpu"))

    def epochs(seed, n=2):
        batches = TensorBatches(images, samples, ["a", "b"], PRE, 4, train=True, seed=seed)
        return [[b for b, _ in batches] for _ in range(n)]
    first, again, other = epochs(0), epochs(0), epochs(1)
    assert [b.shape for b in first[0]] == [(4, 3, 32, 32), (2, 3, 32, 32)]
    assert all(torch.equal(x, y) for e, f in zip(first, again) for x, y in zip(e, f))  # same seed, same draws
    assert not torch.equal(first[0][0], first[1][0])  # each epoch draws anew
    assert not torch.equal(first[0][0], other[0][0])
    # Restoring the generator's state replays an epoch exactly: what resume relies on.
    batches = TensorBatches(images, samples, ["a", "b"], PRE, 4, train=True, seed=0)
    list(batches)
    state = batches.generator.get_state()
    second = [b for b, _ in batches]
    batches.generator.set_state(state)
    assert all(torch.equal(x, y) for x, y in zip(second, [b for b, _ in batches]))


def test_crop_boxes_follow_random_resized_crop_distribution():
    """The same scale, aspect-ratio and position distribution as torchvision's own get_params."""
    torch.manual_seed(0)
    height, width, n = 40, 70, 20000
    theirs = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(3, height, width), list(SCALE), list(RATIO))
                           for _ in range(n)], dtype=torch.float64)
    ours = crop_boxes(torch.full((n,), height), torch.full((n,), width), torch.Generator().manual_seed(0)).double()
    assert ((ours[:, 0] >= 0) & (ours[:, 0] + ours[:, 2] <= height)).all()
    assert ((ours[:, 1] >= 0) & (ours[:, 1] + ours[:, 3] <= width)).all()

    def stats(boxes):
        area = boxes[:, 2] * boxes[:, 3] / (height * width)
        log_aspect = torch.log(boxes[:, 3] / boxes[:, 2])
        centre = (boxes[:, 1] + boxes[:, 3] / 2) / width
        q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
        return torch.cat([area.quantile(q), log_aspect.quantile(q), centre.quantile(q)])
    assert torch.allclose(stats(ours), stats(theirs), atol=0.02)
    assert math.isclose(ours[:, 2].mean().item(), theirs[:, 2].mean().item(), rel_tol=0.02)


def test_crop_boxes_fall_back_to_the_central_crop_like_torchvision():
    # A 1000x10 strip: no try fits, so the crop is central with the aspect clamped to 4/3.
    boxes = crop_boxes(torch.tensor([10]), torch.tensor([1000]), torch.Generator().manual_seed(0))
    expected = T.RandomResizedCrop.get_params(torch.empty(3, 10, 1000), [0.99, 1.0], list(RATIO))
    assert boxes[0].tolist() == list(expected) == [0, 493, 10, 13]


def test_flip_rate_is_one_half_and_flips_mirror_the_crop(data):
    samples, store = data
    batches = TensorBatches(DeviceImages(store, torch.device("cpu")), samples, ["a", "b"], PRE, 6, train=True)
    rows = torch.arange(6)
    flips = [f for _ in range(1000) for f in batches.draw(rows)[1]]
    assert abs(np.mean(flips) - 0.5) < 0.03
    box = [0, 0, 40, 40]
    assert torch.equal(batches.crop(0, box, True), batches.crop(0, box, False).flip(-1))


def test_batched_augmentation_draws_the_crops_of_the_one_by_one_path_and_matches_it(data):
    """What a GPU runs (one batched antialiased resize for the whole batch) against what a CPU runs
    (torch's F.interpolate per image): the same draws, and pixels within 1e-4 of 0-255 values
    (float rounding in another order), so 2e-6 after normalisation."""
    samples, store = data
    images = DeviceImages(store, torch.device("cpu"))
    one_by_one = TensorBatches(images, samples, ["a", "b"], PRE, 4, train=True, seed=3)
    batched = TensorBatches(images, samples, ["a", "b"], PRE, 4, train=True, seed=3, batched=True)
    for _ in range(3):
        for (ours, our_targets), (theirs, their_targets) in zip(batched, one_by_one, strict=True):
            assert torch.equal(our_targets, their_targets)
            assert (ours - theirs).abs().max() < 1e-4 / (255 * min(PRE.std)), (ours - theirs).abs().max()
        assert torch.equal(batched.generator.get_state(), one_by_one.generator.get_state())


@pytest.mark.parametrize("resize_size", [40, 36, 44])
def test_batched_evaluation_resizes_and_centre_crops_as_the_one_by_one_path(data, resize_size):
    """The store holds the images at a 40-px short side: 40 only crops (exactly), 36 shrinks
    (antialiased) and 44 enlarges them first."""
    samples, store = data
    pre = Preprocess(crop_size=32, resize_size=resize_size, mean=PRE.mean, std=PRE.std)
    images = DeviceImages(store, torch.device("cpu"))
    one_by_one = TensorBatches(images, samples, ["a", "b"], pre, 4, train=False)
    batched = TensorBatches(images, samples, ["a", "b"], pre, 4, train=False, batched=True)
    for (ours, _), (theirs, _) in zip(batched, one_by_one, strict=True):
        tolerance = 0 if resize_size == 40 else 1e-4 / (255 * min(PRE.std))
        assert (ours - theirs).abs().max() <= tolerance


def epoch_images(loader) -> list[torch.Tensor]:
    return [images for images, _ in loader]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("augment", ["trivialaugment", "randaugment"])
def test_tensor_batches_augment_training_images_reproducibly_and_resume_replays_them(data, augment, batched):
    samples, store = data
    images = DeviceImages(store, torch.device("cpu"))

    def batches(name, world=World(), train=True):
        return TensorBatches(images, samples, ["a", "b"], PRE, 4, train=train, seed=5, world=world, batched=batched,
                             augment=name)
    plain, strong = epoch_images(batches("none")), epoch_images(batches(augment))
    assert [b.shape for b in strong] == [b.shape for b in plain] and not same(strong, plain)
    assert same(epoch_images(batches(augment)), strong)  # seeded from the loader's seed
    evaluated = epoch_images(batches(augment, train=False))
    assert same(evaluated, epoch_images(batches("none", train=False)))  # evaluation is never augmented
    # Two processes each augment their share of the batch a single process augments.
    shares = [epoch_images(batches(augment, World(rank, 2))) for rank in (0, 1)]
    assert same([torch.cat(pair) for pair in zip(*shares)], strong)
    # The seeds come from the loader's generator, which resume restores.
    loader = batches(augment)
    state = loader.generator.get_state()
    second = epoch_images(loader)
    loader.generator.set_state(state)
    assert same(epoch_images(loader), second)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_pil_path_augments_training_images_seeded_by_the_loader(data, workers):
    samples, store = data

    def loader(name, train=True):
        dataset = ImageDataset(samples, ["a", "b"], build_transform(PRE, train, name), store)
        return make_loader(dataset, 4, train, seed=5, workers=workers)
    torch.manual_seed(0)
    plain = epoch_images(loader("none"))
    torch.manual_seed(0)
    state, strong = torch.get_rng_state(), epoch_images(loader("trivialaugment"))
    assert [b.shape for b in strong] == [b.shape for b in plain] and not same(strong, plain)
    torch.set_rng_state(state)  # without workers, torch's generator draws: resume restores it
    assert same(epoch_images(loader("trivialaugment")), strong)
    assert same(epoch_images(loader("trivialaugment", train=False)), epoch_images(loader("none", train=False)))
