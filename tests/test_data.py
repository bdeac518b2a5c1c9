import numpy as np
import pytest
import torch
from conftest import make_image
from PIL import Image

from transferlab.data import (ImageDataset, Sample, build_transform, decode_all, load_image, read_split,
                             write_split)
from transferlab.models import Preprocess

PRE = Preprocess(crop_size=32, resize_size=40, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK", "I;16", "1"])
def test_every_pillow_mode_becomes_8bit_rgb(tmp_path, mode):
    path = tmp_path / f"image.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.new("RGB", (30, 20), (250, 128, 10)).convert(mode).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (30, 20)


def test_16bit_png_is_rescaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(path)
    assert load_image(path).getpixel((0, 0)) == (128, 128, 128)


def test_transparency_lands_on_white(tmp_path):
    path = tmp_path / "alpha.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(path)
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (60, 20), (10, 200, 10)).save(path, exif=exif)
    assert load_image(path).size == (20, 60)


def test_decoded_once_at_the_size_the_transforms_need(tmp_path):
    path = make_image(tmp_path / "big.jpg", (100, 150, 200), seed=0, size=(800, 600))
    small = load_image(path, min_side=40)
    assert min(small.size) == 40 and small.size == (53, 40)
    assert load_image(path, min_side=1000).size == (800, 600)  # never enlarged


def test_dataset_yields_normalised_crops_and_label_indices(tmp_path):
    samples = [Sample(str(make_image(tmp_path / f"{c}{i}.jpg", (9, 9, 9), i)), c) for c in "ab" for i in range(2)]
    for train in (True, False):
        dataset = ImageDataset(samples, ["a", "b"], build_transform(PRE, train), min_side=PRE.resize_size)
        image, target = dataset[3]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and target == 1
        assert min(dataset.images[0].shape[:2]) == PRE.resize_size
    with pytest.raises(ValueError, match="not among the model's classes"):
        ImageDataset(samples, ["a"], build_transform(PRE, False))


def test_split_csv_round_trip(tmp_path):
    rows = [Sample("data/raw/train/ants/ä b.jpg", "ants"), Sample("x,y.jpg", "bees")]
    write_split(tmp_path / "train.csv", rows)
    assert read_split(tmp_path / "train.csv") == rows


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
