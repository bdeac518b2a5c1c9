"""How well does the near-copy check separate copies from distinct images, and what does it cost?

    python benchmarks/near_duplicates.py --archive ../shared/data/hymenoptera_data.zip [--images 10000]
        [--compare 100000] [--plain 10000] [--old]

1. On the archive's JPEGs: the distinct pairs that are near-copies at each threshold (false
   positives) and the share of each image's changed copies (resized, re-encoded, cropped,
   brightened, mirrored) that is found.
2. A ten-class folder of distinct low-detail images (flat colours, some of them CMYK JPEGs,
   gradients, shapes and digits on plain backgrounds; 40 training and 10 test images a class) with
   ten changed copies of test photos planted in train/: the images the split leaves out or moves.
3. Hashing `--images` generated 500x375 JPEGs from an empty cache, and the pairs among them, all
   distinct, within pHash distance 8 and those that are near-copies by the whole check (false
   positives on a second folder).
4. The split's comparisons (a fifth as test against the rest, then val against train) on
   `--compare` random hashes, and on `--plain` flat images of random colours (the case where the
   hashes collapse and thumbnails decide): seconds and peak memory (tracemalloc). With `--old`, the
   comparison this replaced (1,024 queries against every reference at once), on the same hashes.
"""
import argparse
import io
import sys
import tempfile
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from transferlab.images import Sample
from transferlab.near_duplicates import Fingerprints, fingerprint, fingerprints, nearest, pairs
from transferlab.splits import make_splits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_near_duplicates import PLAIN_KINDS, save_plain  # noqa: E402  the tests' low-detail images

THRESHOLDS = (4, 6, 8, 10, 12)
PLANTED = ("resized to half", "JPEG quality 30", "cropped 2% each side", "brightened 30%", "mirrored")


def changed(image: Image.Image) -> dict[str, Image.Image]:
    def jpeg(quality):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")

    def crop(share):
        dx, dy = int(image.width * share), int(image.height * share)
        return image.crop((dx, dy, image.width - dx, image.height - dy))
    return {"resized to half": image.resize((image.width // 2, image.height // 2)), "JPEG quality 30": jpeg(30),
            "cropped 2% each side": crop(0.02), "cropped 4% each side": crop(0.04),
            "brightened 30%": ImageEnhance.Brightness(image).enhance(1.3), "mirrored": ImageOps.mirror(image)}


def print_of(image: Image.Image, folder: Path, name: str) -> Fingerprints:
    path = folder / f"{name}.png"
    image.save(path)
    return fingerprint(path)


def separation(archive: Path) -> None:
    with zipfile.ZipFile(archive) as zf, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = [n for n in zf.namelist() if n.lower().endswith((".jpg", ".jpeg"))]
        images = [Image.open(io.BytesIO(zf.read(n))).convert("RGB") for n in names]
        prints = Fingerprints.join([print_of(im, folder, f"o{i}") for i, im in enumerate(images)])
        detail = f"{prints.detail.min()} to {prints.detail.max()}"
        print(f"{len(images)} photos, {len(images) * (len(images) - 1) // 2} distinct pairs, the closest at pHash "
              f"distance {hash_distances(prints).min()}; detail (of 64) from {detail}")
        copies = {}
        for i, image in enumerate(images):
            for change, copy in changed(image).items():
                copies.setdefault(change, []).append(print_of(copy, folder, "c"))
        print("| threshold | distinct pairs found (false positives) | " + " | ".join(copies) + " |")
        print("|---|---|" + "---|" * len(copies))
        for t in THRESHOLDS:
            found = " | ".join(f"{found_share(Fingerprints.join(c), prints, t):.0%}" for c in copies.values())
            print(f"| {t} | {distinct_pairs(prints, t)} | {found} |")


def found_share(copies: Fingerprints, originals: Fingerprints, threshold: int) -> float:
    """The share of copies whose nearest near-copy is their own original (copy i of original i)."""
    where, distance = nearest(copies, originals, threshold)
    return float(np.mean((distance <= threshold) & (where == np.arange(len(copies)))))


def distinct_pairs(prints: Fingerprints, threshold: int) -> int:
    """Pairs of different images that are near-copies, each counted once."""
    found = set()
    for q, r, _ in pairs(prints, prints, threshold):
        found.update((int(a), int(b)) for a, b in zip(q, r) if a < b)
    return len(found)


def hash_distances(prints: Fingerprints) -> np.ndarray:
    """The pHash distance (the smaller of straight and mirrored) of every pair of different images."""
    h, rows = prints.hashes, []
    for i in range(len(h) - 1):
        later = h[i + 1:]
        rows.append(np.minimum(np.bitwise_count(h[i, 0] ^ later[:, 0]), np.bitwise_count(h[i, 0] ^ later[:, 1])))
    return np.concatenate(rows)


def scene(rng: np.random.Generator, size=(320, 240)) -> Image.Image:
    """A smooth random scene, as photo-like as pHash needs (its energy in the low frequencies)."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    grain = rng.normal(0, 6, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(coarse) + grain, 0, 255).astype(np.uint8))


def plain_folder() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        for c, kind in enumerate(PLAIN_KINDS):
            for split, n in (("train", 40), ("val", 10)):
                for i in range(n):
                    seed = 1000 * c + i + 500 * (split == "val")
                    save_plain(kind, seed, raw / split / kind.replace(" ", "-") / str(i))
        rng = np.random.default_rng(0)
        (raw / "val" / "photo").mkdir()
        (raw / "train" / "photo").mkdir()
        planted = []  # (path, change): two copies of each of the tests' changes
        for i, change in enumerate(PLANTED * 2):
            photo = scene(rng)
            photo.save(raw / "val" / "photo" / f"{i}.jpg")
            changed(photo)[change].save(raw / "train" / "photo" / f"copy-{i}.jpg")
            scene(rng).save(raw / "train" / "photo" / f"other-{i}.jpg")
            planted.append((str(raw / "train" / "photo" / f"copy-{i}.jpg"), change))
        _, report = make_splits(raw, 0.2, 0.2, seed=0, near_distance=8)
        found = report["near_duplicates"]["pairs"]
        left_out = {p["path"] for p in found if p["action"] == "left out of train and val"}
        caught = [change for path, change in planted if path in left_out]
        plain_out = [p for p in found if "/photo/" not in p["path"]]
        cross = sum(Path(p["path"]).parent.name != Path(p["twin"]).parent.name for p in plain_out)
        out, moved = (sum(p["action"].startswith(a) for p in plain_out) for a in ("left", "moved"))
        print(f"low-detail folder, {len(PLAIN_KINDS)} classes: {out} of its 400 training-folder images left out, "
              f"{moved} moved from val to train ({cross} of these pairs across classes); planted copies caught "
              f"{len(caught)} of {len(planted)} (missed: {[c for _, c in planted if c not in caught] or 'none'})")


def cost(images: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rng = np.random.default_rng(0)
        samples = []
        for i in range(images):
            path = folder / f"{i}.jpg"
            scene(rng, (500, 375)).save(path, quality=90)
            samples.append(Sample(str(path), "x"))
        start = time.perf_counter()
        prints = fingerprints(samples, folder / "cache")
        hashing = time.perf_counter() - start
        start = time.perf_counter()
        fingerprints(samples, folder / "cache")
        cached = time.perf_counter() - start
        print(f"{images} images: hashing {hashing:.1f} s from an empty cache ({1000 * hashing / images:.2f} ms each), "
              f"{cached:.1f} s from the cache")
        print(f"distinct generated images: {images * (images - 1) // 2} pairs, {(hash_distances(prints) <= 8).sum()} "
              f"within pHash distance 8, {distinct_pairs(prints, 8)} of them near-copies once thumbnails agree too")


def split_comparisons(prints: Fingerprints, compare) -> tuple[float, float]:
    """Seconds and peak MB of the split's comparisons: a fifth as test against the rest, then val
    (a fifth of the rest) against train."""
    n = len(prints)
    test, pool = prints[: n // 5], prints[n // 5:]
    val, train = pool[: len(pool) // 5], pool[len(pool) // 5:]
    tracemalloc.start()
    start = time.perf_counter()
    compare(pool, test)
    compare(val, train)
    seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return seconds, peak


def old_nearest(queries: Fingerprints, references: Fingerprints) -> None:
    """The comparison this replaced: 1,024 queries against every reference, straight and mirrored."""
    q, r = queries.hashes, references.hashes
    for start in range(0, len(q), 1024):
        block = q[start:start + 1024]
        distance = np.minimum(np.bitwise_count(block[:, None, 0] ^ r[None, :, 0]),
                              np.bitwise_count(block[:, None, 0] ^ r[None, :, 1])).astype(np.int64)
        distance.argmin(1), distance.min(1)


def comparisons(n: int, plain: int, old: bool) -> None:
    rng = np.random.default_rng(0)
    detailed = Fingerprints(rng.integers(0, 2**64, (n, 2), dtype=np.uint64), np.full(n, 64, np.uint8),
                            np.zeros((n, 8, 8, 3), np.uint8))
    seconds, peak = split_comparisons(detailed, lambda q, r: nearest(q, r, 8))
    print(f"comparisons, {n} random hashes: {seconds:.1f} s, peak {peak:.0f} MB")
    if old:
        seconds, peak = split_comparisons(detailed, old_nearest)
        print(f"  the old comparison on the same hashes: {seconds:.1f} s, peak {peak:.0f} MB")
    colours = rng.integers(0, 256, (plain, 1, 1, 3), dtype=np.uint8)
    flat = Fingerprints(np.uint64(1 << 63) | rng.integers(0, 2, (plain, 2), dtype=np.uint64), np.ones(plain, np.uint8),
                        np.ascontiguousarray(np.broadcast_to(colours, (plain, 8, 8, 3))))
    seconds, peak = split_comparisons(flat, lambda q, r: nearest(q, r, 8))
    print(f"comparisons, {plain} flat images of random colours (hashes all within a bit): {seconds:.1f} s, "
          f"peak {peak:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, help="hymenoptera_data.zip (the separation table)")
    parser.add_argument("--images", type=int, default=10000, help="generated JPEGs hashed (0: skip)")
    parser.add_argument("--compare", type=int, default=100000, help="random hashes compared")
    parser.add_argument("--plain", type=int, default=10000, help="flat images compared")
    parser.add_argument("--old", action="store_true", help="also time the comparison this replaced (1.5 GB at 100,000)")
    args = parser.parse_args()
    if args.archive is not None:
        separation(args.archive)
    plain_folder()
    if args.images:
        cost(args.images)
    comparisons(args.compare, args.plain, args.old)


if __name__ == "__main__":
    main()
