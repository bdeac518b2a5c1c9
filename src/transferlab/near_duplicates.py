"""Near-copies across splits. A test image whose resized, re-encoded, slightly cropped, brightened or
mirrored twin is trained on inflates every mode that saw the twin; scraped datasets hold many
(Barz & Denzler, "Do We Train on Test Data?", 2020: 3.3% of CIFAR-10's test images, 10% of
CIFAR-100's).

Each image gets a 64-bit perceptual hash (imagehash's pHash: the signs of the lowest 8x8
frequencies of its DCT), of itself and of its mirror image, computed once per content digest and
cached. Two images are near-copies when the Hamming distance between their hashes, the smaller of
straight and mirrored, is at most a threshold (`split.near_duplicate_distance`; the README says
how 8 was chosen). Comparing is a popcount over every pair, in blocks: cheap at 10,000 images.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from transferlab.errors import warn
from transferlab.files import write_json
from transferlab.images import Sample, file_digest, load_image

CACHE_NAME = "phash-v1.json"  # in the cache folder: content digest -> [hash, mirrored hash]
_HASH_SIDE = 128  # decoded this small first: pHash looks at 32x32 anyway
_BLOCK = 1024     # rows compared at once: memory stays at a few MB whatever the number of images


def perceptual_hashes(samples: list[Sample], cache_dir: str | Path | None) -> np.ndarray:
    """(n, 2) uint64: each sample's pHash and its mirror image's, read from the cache where known
    (no cache folder: all computed, nothing kept)."""
    path = Path(cache_dir) / CACHE_NAME if cache_dir is not None else None
    cached = _read_cache(path) if path is not None else {}
    digests = [file_digest(s.path).hex() for s in samples]
    missing = {d: s.path for d, s in zip(digests, samples) if d not in cached}
    for digest, image_path in missing.items():
        cached[digest] = image_hashes(image_path)
    if missing and path is not None:
        write_json(path, cached)
    return np.array([cached[d] for d in digests], dtype=np.uint64).reshape(len(samples), 2)


def image_hashes(path: str | Path) -> list[int]:
    """The pHash of the image at `path` and of its mirror image, as integers."""
    import imagehash  # here: only the split stage hashes
    from PIL import ImageOps

    image = load_image(path, _HASH_SIDE)
    return [_as_int(imagehash.phash(image)), _as_int(imagehash.phash(ImageOps.mirror(image)))]


def _as_int(image_hash) -> int:
    return int("".join("1" if bit else "0" for bit in image_hash.hash.flatten()), 2)


def _read_cache(path: Path) -> dict[str, list[int]]:
    if not path.exists():
        return {}
    try:
        cached = json.loads(path.read_text())
        if not all(isinstance(v, list) and len(v) == 2 for v in cached.values()):
            raise ValueError("not a map of digests to two hashes")
        return cached
    except (OSError, ValueError, AttributeError) as err:
        warn(f"{path}: unreadable ({err}); hashing the images again")
        return {}


def nearest(queries: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query hash pair, the index of the closest reference and its distance (the smaller
    of straight and mirrored Hamming distance); distance 65 where there is no reference."""
    best = np.full(len(queries), 65, dtype=np.int64)
    where = np.zeros(len(queries), dtype=np.int64)
    if not len(references):
        return where, best
    for start in range(0, len(queries), _BLOCK):
        block = queries[start:start + _BLOCK]
        straight = np.bitwise_count(block[:, None, 0] ^ references[None, :, 0])
        mirrored = np.bitwise_count(block[:, None, 0] ^ references[None, :, 1])
        distance = np.minimum(straight, mirrored).astype(np.int64)
        where[start:start + _BLOCK] = distance.argmin(1)
        best[start:start + _BLOCK] = distance.min(1)
    return where, best


def near_copies(samples: list[Sample], of: list[Sample], threshold: int,
                cache_dir: str | Path | None) -> list[dict]:
    """Every sample within `threshold` of an image of `of`: its path, its twin's and the distance."""
    if not samples or not of:
        return []
    hashes = perceptual_hashes(samples + of, cache_dir)
    where, distance = nearest(hashes[:len(samples)], hashes[len(samples):])
    return [{"path": sample.path, "twin": of[int(where[i])].path, "distance": int(distance[i])}
            for i, sample in enumerate(samples) if distance[i] <= threshold]
