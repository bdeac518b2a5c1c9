"""Near-copies across the splits: found when resized, re-encoded, cropped, brightened or mirrored;
distinct photos left alone; no test image's twin trains, no val image has a twin in train."""
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from transferlab import near_duplicates
from transferlab.images import Sample
from transferlab.near_duplicates import CACHE_NAME, near_copies, perceptual_hashes
from transferlab.splits import make_splits

THRESHOLD = 8  # params.yaml's default


def photo(seed: int, size=(320, 240)) -> Image.Image:
    """A smooth random scene (a photo's energy is in its low frequencies, which pHash reads) with grain."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    grain = rng.normal(0, 6, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(coarse) + grain, 0, 255).astype(np.uint8))


def reencoded(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def cropped(image: Image.Image, share: float) -> Image.Image:
    dx, dy = int(image.width * share), int(image.height * share)
    return image.crop((dx, dy, image.width - dx, image.height - dy))


COPIES = {"resized to half": lambda im: im.resize((im.width // 2, im.height // 2)),
          "JPEG quality 30": lambda im: reencoded(im, 30),
          "cropped 2% each side": lambda im: cropped(im, 0.02),
          "brightened 30%": lambda im: ImageEnhance.Brightness(im).enhance(1.3),
          "mirrored": ImageOps.mirror}


def save(image: Image.Image, path: Path) -> Sample:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95)
    return Sample(str(path), path.parent.name)


@pytest.mark.parametrize("change", COPIES)
def test_a_changed_copy_is_found_within_the_threshold(tmp_path, change):
    originals = [save(photo(seed), tmp_path / "a" / f"{seed}.jpg") for seed in range(6)]
    copy = save(COPIES[change](photo(3)), tmp_path / "b" / "copy.jpg")
    [found] = near_copies([copy], originals, THRESHOLD, None)
    assert found["twin"] == originals[3].path and found["distance"] <= THRESHOLD


def test_distinct_photos_are_not_near_copies(tmp_path):
    samples = [save(photo(seed), tmp_path / "a" / f"{seed}.jpg") for seed in range(40)]
    hashes = perceptual_hashes(samples, None)
    for i, sample in enumerate(samples):
        others = samples[:i] + samples[i + 1:]
        assert near_copies([sample], others, THRESHOLD, None) == [], sample.path
    assert len({int(h) for h in hashes[:, 0]}) == 40


def test_hashes_are_computed_once_per_content_then_read_from_the_cache(tmp_path, monkeypatch):
    samples = [save(photo(seed), tmp_path / "a" / f"{seed}.jpg") for seed in range(3)]
    first = perceptual_hashes(samples, tmp_path / "cache")
    assert (tmp_path / "cache" / CACHE_NAME).exists()

    def no_hashing(path):
        raise AssertionError(f"{path} was hashed again")
    monkeypatch.setattr(near_duplicates, "image_hashes", no_hashing)
    assert np.array_equal(perceptual_hashes(list(reversed(samples)), tmp_path / "cache"), first[::-1])


def test_no_twin_of_a_test_image_trains_and_no_val_image_has_one_in_train(tmp_path):
    raw = tmp_path / "raw"
    for c, label in enumerate(("ants", "bees")):
        for i in range(12):
            save(photo(100 * c + i), raw / "train" / label / f"{i}.jpg")
        for i in range(4):
            save(photo(1000 + 100 * c + i), raw / "val" / label / f"{i}.jpg")
    twin_of_test = save(COPIES["cropped 2% each side"](photo(1000)), raw / "train" / "ants" / "twin-of-test.jpg")
    for i in range(6):  # pairs inside train/: wherever the val split puts one of them, it must not stay apart
        save(COPIES["JPEG quality 30"](photo(100 + i)), raw / "train" / "bees" / f"copy-{i}.jpg")

    splits, report = make_splits(raw, 0.3, 0.2, seed=0, near_distance=THRESHOLD, cache_dir=tmp_path / "cache")
    assert twin_of_test.path not in {s.path for part in splits.values() for s in part}
    assert {"path": twin_of_test.path, "reason": "near-copy of test image " + str(raw / "val/ants/0.jpg")
            + f" (perceptual-hash distance {report['near_duplicates']['pairs'][0]['distance']})"} in report["skipped"]
    moved = [p for p in report["near_duplicates"]["pairs"] if p["action"] == "moved from val to train"]
    assert moved and all(p["distance"] <= THRESHOLD for p in moved)
    train = {s.path for s in splits["train"]}
    assert all(p["path"] in train for p in moved)
    assert near_copies(splits["val"], splits["train"], THRESHOLD, None) == []
    assert near_copies(splits["train"] + splits["val"], splits["test"], THRESHOLD, None) == []

    splits_off, report_off = make_splits(raw, 0.3, 0.2, seed=0)
    assert report_off["near_duplicates"] == {"threshold": "off", "pairs": []}
    assert twin_of_test.path in {s.path for s in splits_off["train"] + splits_off["val"]}
