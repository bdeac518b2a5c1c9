import numpy as np
import pytest
import torch
from conftest import make_image

from transferlab.data import ImageDataset, build_transform, decode_all
from transferlab.errors import UserError
from transferlab.images import Sample
from transferlab.models import Preprocess

PRE = Preprocess(crop_size=32, resize_size=40, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_dataset_yields_normalised_crops_and_label_indices(tmp_path):
    samples = [Sample(str(make_image(tmp_path / f"{c}{i}.jpg", (9, 9, 9), i)), c) for c in "ab" for i in range(2)]
    for train in (True, False):
        dataset = ImageDataset(samples, ["a", "b"], build_transform(PRE, train), min_side=PRE.resize_size)
        image, target = dataset[3]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and target == 1
        assert min(dataset.images[0].shape[:2]) == PRE.resize_size
    with pytest.raises(UserError, match="not among the model's classes.*run dvc repro"):
        ImageDataset(samples, ["a"], build_transform(PRE, False))


def test_decode_cache_is_shared_and_keyed_by_image_bytes_and_size(tmp_path):
    samples = [Sample(str(make_image(tmp_path / f"{i}.jpg", (50 * i, 90, 9), i, (120, 90))), "a") for i in range(3)]
    cache = tmp_path / "cache"
    first = decode_all(samples, 45, cache)
    assert [a.shape for a in first] == [(45, 60, 3)] * 3 and len(list(cache.iterdir())) == 1
    again = decode_all(samples, 45, cache)  # read back from the cache file
    assert all(np.array_equal(a, b) for a, b in zip(first, again)) and len(list(cache.iterdir())) == 1
    decode_all(samples, 30, cache)
    make_image(tmp_path / "0.jpg", (255, 255, 255), 0, (120, 90))
    changed = decode_all(samples, 45, cache)
    assert len(list(cache.iterdir())) == 3 and not np.array_equal(changed[0], first[0])
