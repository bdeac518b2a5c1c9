"""Near-copies across the splits: found when resized, re-encoded, cropped, brightened or mirrored;
distinct photos and distinct low-detail images left alone; no test image's twin trains, no val
image has a twin in train, even through a chain; hashes never read from another setting's cache;
the index finds what comparing every pair finds, in memory that does not grow with the folder."""
import io
import tracemalloc
from pathlib import Path

import imagehash
import numpy as np
import PIL
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

from transferlab import images, near_duplicates
from transferlab.images import Sample
from transferlab.near_duplicates import Fingerprints, cache_path, fingerprints, near_copies, nearest
from transferlab.splits import make_splits, move_near_copies

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


PLAIN_KINDS = ("flat", "flat CMYK", "horizontal gradient", "vertical gradient", "disc", "square", "triangle",
               "digit 2", "digit 5", "digit 7")


def plain(kind: str, seed: int, side: int = 48) -> Image.Image:
    """A low-detail image: a flat colour (RGB, or CMYK for a JPEG), a two-colour gradient, or a shape
    or digit on a plain background, its colours, size and place drawn with `seed`."""
    rng = np.random.default_rng(seed)
    back, fore = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
    if kind == "flat":
        return Image.new("RGB", (side, side), back)
    if kind == "flat CMYK":
        return Image.new("CMYK", (side, side), back + (0,))
    if kind.endswith("gradient"):
        ramp = np.linspace(np.array(back), np.array(fore), side)
        rows = ramp[None] if kind.startswith("horizontal") else ramp[:, None]
        return Image.fromarray(np.broadcast_to(rows, (side, side, 3)).astype(np.uint8))
    image = Image.new("RGB", (side, side), back)
    draw = ImageDraw.Draw(image)
    (x, y), size = rng.integers(0, side // 2, 2), int(rng.integers(side // 3, side // 2))
    if kind == "disc":
        draw.ellipse((x, y, x + size, y + size), fill=fore)
    elif kind == "square":
        draw.rectangle((x, y, x + size, y + size), fill=fore)
    elif kind == "triangle":
        draw.polygon([(x, y + size), (x + size, y + size), (x + size // 2, y)], fill=fore)
    else:
        draw.text((x, y - side // 8), kind[-1], fill=fore, font=ImageFont.load_default(size=side // 2 + size // 2))
    return image


def save_plain(kind: str, seed: int, path: Path) -> Sample:
    return save(plain(kind, seed), path.with_suffix(".jpg" if "CMYK" in kind else ".png"))


@pytest.mark.parametrize("change", COPIES)
def test_a_changed_copy_is_found_within_the_threshold(tmp_path, change):
    originals = [save(photo(seed), tmp_path / "a" / f"{seed}.jpg") for seed in range(6)]
    copy = save(COPIES[change](photo(3)), tmp_path / "b" / "copy.jpg")
    [found] = near_copies([copy], originals, THRESHOLD, None)
    assert found["twin"] == originals[3].path and found["distance"] <= THRESHOLD


def test_distinct_photos_are_not_near_copies(tmp_path):
    samples = [save(photo(seed), tmp_path / "a" / f"{seed}.jpg") for seed in range(40)]
    hashes = fingerprints(samples, None).hashes
    for i, sample in enumerate(samples):
        others = samples[:i] + samples[i + 1:]
        assert near_copies([sample], others, THRESHOLD, None) == [], sample.path
    assert len({int(h) for h in hashes[:, 0]}) == 40


def test_hashes_are_computed_once_per_content_then_read_from_the_cache(tmp_path, monkeypatch):
    samples = [save(photo(seed), tmp_path / "a" / f"{seed}.jpg") for seed in range(3)]
    first = fingerprints(samples, tmp_path / "cache")
    assert cache_path(tmp_path / "cache").exists()

    def no_hashing(path):
        raise AssertionError(f"{path} was hashed again")
    monkeypatch.setattr(near_duplicates, "fingerprint", no_hashing)
    again = fingerprints(list(reversed(samples)), tmp_path / "cache")
    for field in ("hashes", "detail", "thumbs"):
        assert np.array_equal(getattr(again, field), getattr(first, field)[::-1])


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


@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04 not a zip", None])
def test_a_damaged_hash_cache_is_hashed_again_with_one_warning(tmp_path, capsys, damage):
    samples = [save(photo(seed), tmp_path / "a" / f"{seed}.jpg") for seed in range(3)]
    fresh = fingerprints(samples, None)
    path = cache_path(tmp_path / "cache")
    path.parent.mkdir()
    if damage is None:  # readable, but not the arrays it should hold
        np.savez(path, digests=np.zeros((3, 31), np.uint8))
    else:
        path.write_bytes(damage)
    assert np.array_equal(fingerprints(samples, tmp_path / "cache").hashes, fresh.hashes)
    assert capsys.readouterr().err.count("hashing the images again") == 1
    assert np.array_equal(fingerprints(samples, tmp_path / "cache").hashes, fresh.hashes)  # rebuilt
    assert capsys.readouterr().err == ""


SETTINGS = {"hash side": (near_duplicates, "_HASH_SIDE", 64), "Pillow": (PIL, "__version__", "9.0.0"),
            "imagehash": (imagehash, "__version__", "4.0.0"),
            "loader": (images, "LOADER_VERSION", images.LOADER_VERSION + 1)}


@pytest.mark.parametrize("setting", SETTINGS)
def test_hashes_cached_under_another_setting_are_not_read(tmp_path, monkeypatch, setting):
    samples = [save(photo(seed), tmp_path / "a" / f"{seed}.jpg") for seed in range(4)]
    with monkeypatch.context() as other:
        other.setattr(*SETTINGS[setting])
        # Stands for what that setting changes: here every image decodes to the same picture.
        other.setattr(near_duplicates, "load_image", lambda path, side: photo(0))
        assert len(near_copies(samples[1:], samples[:1], THRESHOLD, tmp_path / "cache")) == 3
    assert near_copies(samples[1:], samples[:1], THRESHOLD, tmp_path / "cache") == []


def disc(fill: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (48, 48), "white")
    ImageDraw.Draw(image).ellipse((10, 10, 34, 34), fill=fill)
    return image


# Pairs that pHash alone puts 0 to 7 bits apart: a flat image's hash is its mean's bit and rounding
# noise, a plain gradient's a few bits more; two discs of one size and place differ only in colour.
LOOKALIKES = {
    "black and white": lambda: (Image.new("RGB", (48, 48), "black"), Image.new("RGB", (48, 48), "white")),
    "a flat red and a CMYK JPEG of another red": lambda: (Image.new("RGB", (48, 48), (200, 60, 40)),
                                                          Image.new("CMYK", (48, 48), (0, 200, 200, 0))),
    "a gradient and a flat grey": lambda: (plain("horizontal gradient", 0), Image.new("RGB", (48, 48), "grey")),
    "two gradients": lambda: (plain("horizontal gradient", 0), plain("horizontal gradient", 1)),
    "a red and a blue disc on white": lambda: (disc((220, 30, 30)), disc((30, 30, 220))),
}


@pytest.mark.parametrize("pair", LOOKALIKES)
def test_low_detail_lookalikes_are_not_near_copies(tmp_path, pair):
    a, b = (save(image, tmp_path / f"{name}.{'jpg' if image.mode == 'CMYK' else 'png'}")
            for name, image in zip("ab", LOOKALIKES[pair]()))
    assert near_copies([a], [b], THRESHOLD, None) == []


def test_a_folder_of_distinct_low_detail_images_keeps_them_and_still_loses_the_copies(tmp_path):
    """Swatches, gradients, shapes and digits on plain backgrounds: at most 1% of them left out or
    moved, while the changed copies of test photos and a re-encoded copy of a test swatch are left out."""
    raw = tmp_path / "raw"
    for c, kind in enumerate(PLAIN_KINDS):
        for split, n in (("train", 16), ("val", 4)):
            for i in range(n):
                save_plain(kind, 100 * c + i + 50 * (split == "val"), raw / split / kind.replace(" ", "-") / str(i))
    tests = [save(photo(seed), raw / "val" / "photo" / f"{seed}.jpg") for seed in range(len(COPIES))]
    for seed in range(6):
        save(photo(100 + seed), raw / "train" / "photo" / f"other-{seed}.jpg")
    copies = [save(change(photo(seed)), raw / "train" / "photo" / f"copy-{seed}.jpg")
              for seed, change in enumerate(COPIES.values())]
    swatch = save(reencoded(plain("flat", 50), 30), raw / "train" / "flat" / "copy.jpg")  # of val/flat/0.png

    splits, report = make_splits(raw, 0.2, 0.2, seed=0, near_distance=THRESHOLD)
    pairs = report["near_duplicates"]["pairs"]
    left_out = {p["path"]: p["twin"] for p in pairs if p["action"] == "left out of train and val"}
    assert {left_out.pop(c.path, None) for c in copies} == {t.path for t in tests}
    assert left_out.pop(swatch.path, None) == str(raw / "val" / "flat" / "0.png")
    moved = [p for p in pairs if p["action"] == "moved from val to train"]
    assert len(left_out) <= 0.01 * 160 and len(moved) <= 0.01 * 160, (left_out, moved)


def test_a_chain_of_near_copies_in_val_moves_to_train_together(tmp_path):
    """Frames of a pan, the first in train: each is a near-copy of the next, the last ones of no image
    in train. Moving only the val frames close to the first would leave the rest in val with their
    twins in train."""
    scene = photo(4, size=(480, 240))
    frames = [save(scene.crop((x, 0, x + 320, 240)), tmp_path / "pan" / f"{x}.png") for x in range(0, 40, 8)]
    hashes = fingerprints(frames, None).hashes

    def distance(a, b):
        return int(min(np.bitwise_count(hashes[a, 0] ^ hashes[b, k]) for k in (0, 1)))
    assert all(distance(i, i + 1) <= THRESHOLD for i in range(len(frames) - 1))
    assert distance(0, len(frames) - 1) > THRESHOLD
    others = [save(photo(seed), tmp_path / "other" / f"{seed}.jpg") for seed in range(20, 26)]

    train, val, moved = move_near_copies([frames[0], *others[:3]], [*frames[1:], *others[3:]], THRESHOLD, None)
    assert val == others[3:]
    index = {frame.path: i for i, frame in enumerate(frames)}
    assert sorted(index[row["path"]] for row in moved) == list(range(1, len(frames)))
    assert all(distance(index[row["path"]], index[row["twin"]]) == row["distance"] <= THRESHOLD for row in moved)
    assert near_copies(val, train, THRESHOLD, None) == []


def random_prints(rng: np.random.Generator, n: int) -> Fingerprints:
    """Random hashes of detailed images whose thumbnails agree: the hashes alone decide."""
    hashes = rng.integers(0, 2**64, (n, 2), dtype=np.uint64)
    return Fingerprints(hashes, np.full(n, 64, np.uint8), np.zeros((n, 8, 8, 3), np.uint8))


# Few references: every pair compared; more: through the index; a batch of 5: candidates in many batches.
@pytest.mark.parametrize("threshold, references, batch",
                         [(0, 3000, None), (5, 3000, None), (8, 3000, None), (13, 3000, None), (8, 3000, 5),
                          (8, 40, None), (64, 40, None)])
def test_the_index_finds_what_comparing_every_pair_finds(monkeypatch, threshold, references, batch):
    if batch:
        monkeypatch.setattr(near_duplicates, "_BATCH", batch)
    rng = np.random.default_rng(threshold)
    queries, refs = random_prints(rng, 400), random_prints(rng, references)
    for i in range(0, len(queries), 2):  # half of them planted near a reference, straight or mirrored
        bits = rng.choice(64, rng.integers(0, min(threshold + 3, 65)), replace=False)
        flips = np.bitwise_or.reduce(np.uint64(1) << bits.astype(np.uint64), initial=np.uint64(0))
        queries.hashes[i, 0] = refs.hashes[rng.integers(references), rng.integers(2)] ^ flips
    where, distance = nearest(queries, refs, threshold)

    every = np.minimum(*(np.bitwise_count(queries.hashes[:, None, 0] ^ refs.hashes[None, :, k]) for k in (0, 1)))
    closest, found = every.min(1).astype(np.int64), every.min(1) <= threshold
    assert found.sum() >= 40
    assert np.array_equal(distance, np.where(found, closest, 65))
    assert np.array_equal(where[found], every.argmin(1)[found])


def test_images_of_little_detail_are_matched_as_checking_every_pair_would(tmp_path):
    """Plain images' hashes collapse to a bit or two, so their pairs are picked by thumbnail, not by the index."""
    rng = np.random.default_rng(1)
    refs = random_prints(rng, 300)
    refs.detail[::2] = 1
    refs.hashes[::2] = np.uint64(1 << 63) | rng.integers(0, 2, (150, 2), dtype=np.uint64)
    refs.thumbs[:] = rng.integers(0, 256, refs.thumbs.shape)
    queries = refs[rng.integers(0, 300, 200)]  # copies, changed: some thumbnails too much, some hashes too far
    queries.detail[::3] = 64
    noise = rng.normal(0, rng.uniform(0, 9, (200, 1, 1, 1)), queries.thumbs.shape)
    queries.thumbs[:] = np.clip(queries.thumbs + noise, 0, 255)
    queries.thumbs[::2] = queries.thumbs[::2, :, ::-1]
    for i in range(200):
        bits = rng.choice(64, rng.integers(0, THRESHOLD + 3), replace=False)
        queries.hashes[i, 0] ^= np.bitwise_or.reduce(np.uint64(1) << bits.astype(np.uint64), initial=np.uint64(0))
    where, distance = nearest(queries, refs, THRESHOLD)

    q, r = np.divmod(np.arange(200 * 300), 300)
    every = np.minimum(*(np.bitwise_count(queries.hashes[q, 0] ^ refs.hashes[r, k]) for k in (0, 1))).astype(np.int64)
    agree = near_duplicates._confirmed(queries[q], refs[r])
    every = np.where((every <= THRESHOLD) & agree, every, 65).reshape(200, 300)
    assert 20 <= (every.min(1) <= THRESHOLD).sum() <= 180
    assert np.array_equal(distance, every.min(1))
    assert np.array_equal(where[distance <= THRESHOLD], every.argmin(1)[distance <= THRESHOLD])


def test_comparing_a_split_of_10000_images_takes_a_few_mb(tmp_path):
    """The old comparison held 1,024 queries times every reference, several arrays deep: 152 MB here."""
    rng = np.random.default_rng(0)
    queries, references = random_prints(rng, 2000), random_prints(rng, 8000)
    tracemalloc.start()
    try:
        nearest(queries, references, THRESHOLD)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10e6, f"{peak / 1e6:.0f} MB"
