"""How well does the perceptual-hash check separate copies from distinct photos, and what does it cost?

    python benchmarks/near_duplicates.py --archive ../shared/data/hymenoptera_data.zip [--images 10000]

1. On the archive's JPEGs: the distance of every distinct pair (false positives at each threshold)
   and of each image to a changed copy of itself (resized, re-encoded, cropped, brightened,
   mirrored): the share of copies found at each threshold.
2. Cost: hashing `--images` generated 500x375 JPEGs from an empty cache, then one split's
   comparisons (a fifth as test against the rest, then val against train); and, all of them
   being distinct, the pairs among them within distance 8 (false positives on a second folder).
"""
import argparse
import io
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from transferlab.images import Sample
from transferlab.near_duplicates import image_hashes, nearest, perceptual_hashes

THRESHOLDS = (4, 6, 8, 10, 12)


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


def hash_of(image: Image.Image, folder: Path, name: str) -> np.ndarray:
    path = folder / f"{name}.png"
    image.save(path)
    return np.array(image_hashes(path), dtype=np.uint64)


def separation(archive: Path) -> None:
    with zipfile.ZipFile(archive) as zf, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = [n for n in zf.namelist() if n.lower().endswith((".jpg", ".jpeg"))]
        images = [Image.open(io.BytesIO(zf.read(n))).convert("RGB") for n in names]
        hashes = np.stack([hash_of(im, folder, f"o{i}") for i, im in enumerate(images)])
        pairs = np.concatenate([nearest_all(hashes, i) for i in range(len(images))])
        print(f"{len(images)} photos, {len(pairs)} distinct pairs; closest pair at distance {pairs.min()}")
        print("| threshold | distinct pairs within (false positives) | " + " | ".join(changed(images[0])) + " |")
        print("|---|---|" + "---|" * len(changed(images[0])))
        copies = {}
        for i, image in enumerate(images):
            for change, copy in changed(image).items():
                _, d = nearest(hash_of(copy, folder, "c")[None], hashes[i:i + 1])
                copies.setdefault(change, []).append(int(d[0]))
        for t in THRESHOLDS:
            found = " | ".join(f"{np.mean(np.array(d) <= t):.0%}" for d in copies.values())
            print(f"| {t} | {int((pairs <= t).sum())} | {found} |")


def nearest_all(hashes: np.ndarray, i: int) -> np.ndarray:
    """Distances of image i to every later image, the smaller of either one mirrored."""
    later = hashes[i + 1:]
    straight = np.bitwise_count(hashes[i, 0] ^ later[:, 0])
    mirrored = np.minimum(np.bitwise_count(hashes[i, 0] ^ later[:, 1]), np.bitwise_count(hashes[i, 1] ^ later[:, 0]))
    return np.minimum(straight, mirrored).astype(np.int64)


def cost(images: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rng = np.random.default_rng(0)
        samples = []
        for i in range(images):
            coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
            path = folder / f"{i}.jpg"
            coarse.save(path, quality=90)
            samples.append(Sample(str(path), "x"))
        start = time.perf_counter()
        hashes = perceptual_hashes(samples, folder / "cache")
        hashing = time.perf_counter() - start
        start = time.perf_counter()
        perceptual_hashes(samples, folder / "cache")
        cached = time.perf_counter() - start
        test, pool = hashes[: images // 5], hashes[images // 5:]
        start = time.perf_counter()
        nearest(pool, test)
        val, train = pool[: len(pool) // 5], pool[len(pool) // 5:]
        nearest(val, train)
        comparing = time.perf_counter() - start
        print(f"{images} images: hashing {hashing:.1f} s from an empty cache ({1000 * hashing / images:.2f} ms each), "
              f"{cached:.1f} s from the cache; comparisons {comparing:.2f} s")
        within = sum(int((nearest_all(hashes, i) <= 8).sum()) for i in range(images))
        print(f"distinct generated images: {within} of {images * (images - 1) // 2} pairs within distance 8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, help="hymenoptera_data.zip (the separation table)")
    parser.add_argument("--images", type=int, default=10000)
    args = parser.parse_args()
    if args.archive is not None:
        separation(args.archive)
    cost(args.images)


if __name__ == "__main__":
    main()
