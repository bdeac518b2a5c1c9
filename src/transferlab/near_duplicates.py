"""Near-copies across splits. A test image whose resized, re-encoded, slightly cropped, brightened or
mirrored twin is trained on inflates every mode that saw the twin; scraped datasets hold many
(Barz & Denzler, "Do We Train on Test Data?", 2020: 3.3% of CIFAR-10's test images, 10% of
CIFAR-100's).

Each image gets a fingerprint, computed once per content digest and cached: a 64-bit perceptual
hash (imagehash's pHash: the signs of the lowest 8x8 frequencies of its DCT) of itself and of its
mirror image; its detail (how many of those frequencies stand clear of their median, i.e. how many
bits of the hash mean something); and an 8x8 colour thumbnail. Two images are near-copies when
the Hamming distance between their hashes, the smaller of straight and mirrored, is at most a
threshold (`split.near_duplicate_distance`; docs/statistics.md says how 8 was chosen) and their thumbnails
agree (`_agree`): a flat or plain image has a hash of one or two bits, so black and white, or any
flat colour and a gradient, would otherwise be copies of each other.

The search is an index, not every pair: the 64 bits are cut into four 16-bit keys, and two hashes
within t bits are within t // 4 bits in at least one key (pigeonhole), so each query probes the
few buckets near its own keys (100,000 random hashes: 2 s, 12 MB). Images of too little detail,
whose hashes crowd together, are compared with every other image by thumbnail instead, in blocks
of matrix products (10,000 flat colours: under a second). Memory stays at a few MB either way.
"""
from __future__ import annotations

import hashlib
import itertools
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageOps

from transferlab import images
from transferlab.errors import warn
from transferlab.files import atomic_writer
from transferlab.images import Sample, file_digest, load_image

_VERSION = 2      # bump when a fingerprint changes; the side, loader and library versions are in the key too
_HASH_SIDE = 128  # decoded this small first: pHash looks at 32x32 anyway
_THUMB_SIDE = 8
# Thumbnails agree when their colour shares (r, g, b) / (r + g + b) differ by at most _SHARES (RMS
# over cells and channels: brightening leaves shares alone, and hymenoptera's changed copies lie
# within 0.033, but for a few cropped by 4% a side; a red and a blue disc on white are 0.19 apart) and,
# where either image has too little detail for its hash to tell it apart, their values by at most
# _LEVELS grey levels (RMS): flat colours closer are hard to tell apart by eye, and JPEG at quality
# 30 moves a flat colour by less. Measured by benchmarks/near_duplicates.py.
_SHARES = 0.05
_LEVELS = 6.0
_DETAIL = 24      # "enough detail": frequencies clear of the median; hymenoptera's photos have 27 to 61
_KEY_BITS = 16    # four keys of 16 bits: 65,536 buckets, about one hash each at 30,000 references
_BATCH = 1 << 18  # candidate pairs handled at once, whatever the folder
_THUMB_BATCH = 4096  # pairs whose thumbnails are compared at once (float32: 3 MB)
_BLOCK = 512  # images of too little detail compared with others at once, by thumbnail


@dataclass(frozen=True)
class Fingerprints:
    """Per image: pHash and mirrored pHash (n, 2) uint64, detail (n,) uint8, thumbnail (n, 8, 8, 3) uint8."""

    hashes: np.ndarray
    detail: np.ndarray
    thumbs: np.ndarray

    def __len__(self) -> int:
        return len(self.hashes)

    def __getitem__(self, rows) -> Fingerprints:
        return Fingerprints(self.hashes[rows], self.detail[rows], self.thumbs[rows])

    @staticmethod
    def join(parts: list[Fingerprints]) -> Fingerprints:
        return Fingerprints(*(np.concatenate([getattr(p, f) for p in parts])
                              for f in ("hashes", "detail", "thumbs")))

    @staticmethod
    def empty() -> Fingerprints:
        side = _THUMB_SIDE
        return Fingerprints(np.zeros((0, 2), np.uint64), np.zeros(0, np.uint8), np.zeros((0, side, side, 3), np.uint8))


def fingerprints(samples: list[Sample], cache_dir: str | Path | None) -> Fingerprints:
    """Each sample's fingerprint, read from the cache where known (no cache folder: all computed,
    nothing kept)."""
    path = cache_path(cache_dir) if cache_dir is not None else None
    known, rows = _read_cache(path) if path is not None and path.exists() else (Fingerprints.empty(), {})
    digests = [file_digest(s.path) for s in samples]
    missing = {d: s.path for d, s in zip(digests, samples) if d not in rows}
    if missing:
        rows.update({d: len(known) + i for i, d in enumerate(missing)})
        known = Fingerprints.join([known, *(fingerprint(p) for p in missing.values())])
        if path is not None:
            _write_cache(path, known, list(rows))
    return known[np.array([rows[d] for d in digests], dtype=np.int64)]


def cache_path(cache_dir: str | Path) -> Path:
    """The hash cache for these settings. Another side, loader (images.LOADER_VERSION),
    Pillow, imagehash or SciPy may hash the same file otherwise, so it writes a cache of its own."""
    import imagehash
    import scipy

    settings = (f"v{_VERSION}-side{_HASH_SIDE}-thumb{_THUMB_SIDE}-loader{images.LOADER_VERSION}-pillow{PIL.__version__}"
                f"-imagehash{imagehash.__version__}-scipy{scipy.__version__}")
    return Path(cache_dir) / f"phash-{hashlib.sha256(settings.encode()).hexdigest()[:16]}.npz"


def fingerprint(path: str | Path) -> Fingerprints:
    """The fingerprint of the image at `path` (a Fingerprints of one)."""
    import imagehash  # here: only the split stage hashes

    image = load_image(path, _HASH_SIDE)
    hashes = [_as_int(imagehash.phash(im)) for im in (image, ImageOps.mirror(image))]
    thumb = np.asarray(image.resize((_THUMB_SIDE, _THUMB_SIDE), Image.BOX))
    return Fingerprints(np.array([hashes], np.uint64), np.array([_detail(image)], np.uint8), thumb[None])


def _as_int(image_hash) -> int:
    return int("".join("1" if bit else "0" for bit in image_hash.hash.flatten()), 2)


def _detail(image: Image.Image) -> int:
    """How many of the 64 frequencies pHash reads stand clear of their median by a pattern of at
    least one grey level: a flat image has 1 (its mean), a plain gradient 2 to 4. The hash's other
    bits are rounding noise, which is why two flat colours hash alike."""
    from scipy.fft import dctn

    grey = np.asarray(image.convert("L").resize((32, 32), Image.LANCZOS), dtype=np.float64)
    low = dctn(grey, norm="ortho")[:8, :8]
    return int((np.abs(low - np.median(low)) >= 16).sum())  # orthonormal: a cosine of amplitude a gives 16a


def _read_cache(path: Path) -> tuple[Fingerprints, dict[bytes, int]]:
    try:
        with np.load(path, allow_pickle=False) as f:
            digests, known = f["digests"], Fingerprints(f["hashes"], f["detail"], f["thumbs"])
        side = _THUMB_SIDE
        shapes = [(digests.shape, digests.dtype), (known.hashes.shape, known.hashes.dtype),
                  (known.detail.shape, known.detail.dtype), (known.thumbs.shape, known.thumbs.dtype)]
        n = len(digests)
        if shapes != [((n, 32), np.uint8), ((n, 2), np.uint64), ((n,), np.uint8), ((n, side, side, 3), np.uint8)]:
            raise ValueError(f"unexpected arrays {shapes}")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        warn(f"{path}: unreadable ({err}); hashing the images again")
        return Fingerprints.empty(), {}
    return known, {d.tobytes(): i for i, d in enumerate(digests)}


def _write_cache(path: Path, known: Fingerprints, digests: list[bytes]) -> None:
    with atomic_writer(path, "wb") as f:
        np.savez(f, digests=np.frombuffer(b"".join(digests), np.uint8).reshape(-1, 32),
                 hashes=known.hashes, detail=known.detail, thumbs=known.thumbs)


def near_copies(samples: list[Sample], of: list[Sample], threshold: int, cache_dir: str | Path | None,
                chained: bool = False) -> list[dict]:
    """Every sample that is a near-copy of an image of `of`: its path, its twin's and the distance.

    With `chained`, also every sample that is a near-copy of a sample found so, until none is added
    (burst photos and video frames: each close to the next, the last far from the first); its twin
    is then the sample that brought it in."""
    if not samples or not of:
        return []
    prints = fingerprints(samples + of, cache_dir)
    mine, theirs, twins = prints[:len(samples)], prints[len(samples):], of
    left, found = np.arange(len(samples)), []
    while len(left) and len(twins):
        where, distance = nearest(mine[left], theirs, threshold)
        hit = distance <= threshold
        found += [{"path": samples[i].path, "twin": twins[w].path, "distance": int(d)}
                  for i, w, d in zip(left[hit], where[hit], distance[hit])]
        if not chained:
            break
        theirs, twins, left = mine[left[hit]], [samples[i] for i in left[hit]], left[~hit]
    return found


def nearest(queries: Fingerprints, references: Fingerprints, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """For each query, the closest reference that is a near-copy of it and their distance (the
    smaller of straight and mirrored Hamming distance; the lowest index on a tie); distance 65
    where none is within `threshold`."""
    from threadpoolctl import threadpool_limits  # scikit-learn's

    best = np.full(len(queries), 65 << 40, dtype=np.int64)  # distance, then reference index
    # The matrix products of `_alike` are small: BLAS threads would only wait on each other (5x slower).
    with threadpool_limits(1, user_api="blas"):
        for q, r, d in pairs(queries, references, threshold):
            np.minimum.at(best, q, (d << 40) | r)
    return best & ((1 << 40) - 1), best >> 40


def pairs(queries: Fingerprints, references: Fingerprints, threshold: int) -> Iterator[tuple[np.ndarray, ...]]:
    """Batches of (query index, reference index, distance): every pair of near-copies (a pair may
    come twice, straight and mirrored)."""
    detailed_q, detailed_r = queries.detail >= _DETAIL, references.detail >= _DETAIL
    q_rows, r_rows = np.flatnonzero(detailed_q), np.flatnonzero(detailed_r)
    # Both detailed: the hashes tell images apart, and the index finds the few pairs within the threshold.
    found = ((q_rows[q], r_rows[r], d) for q, r, d in
             _within(queries.hashes[q_rows, 0], references.hashes[r_rows], threshold))
    # Either one plain: the hashes say little (all flat images hash alike), so thumbnails pick the pairs.
    every = np.arange(len(references))
    plain = itertools.chain(_alike(queries, references, np.flatnonzero(~detailed_q), every, threshold),
                            _alike(queries, references, q_rows, np.flatnonzero(~detailed_r), threshold))
    for q, r, d in itertools.chain(found, plain):
        for start in range(0, len(q), _THUMB_BATCH):
            part = slice(start, start + _THUMB_BATCH)
            keep = _confirmed(queries[q[part]], references[r[part]])
            yield q[part][keep], r[part][keep], d[part][keep]


def _alike(queries: Fingerprints, references: Fingerprints, q_rows: np.ndarray, r_rows: np.ndarray,
           threshold: int) -> Iterator[tuple[np.ndarray, ...]]:
    """Pairs of q_rows and r_rows within `threshold` bits whose thumbnails may lie within _LEVELS,
    straight or mirrored: every pair, in blocks. Compared at half the side (the RMS of 2x2 means is
    at most the RMS of the values: none is missed), the distances as matrix products."""
    for a in range(0, len(q_rows), _BLOCK):
        q = q_rows[a:a + _BLOCK]
        x = _halved(queries.thumbs[q])
        for b in range(0, len(r_rows), _BLOCK):
            r = r_rows[b:b + _BLOCK]
            close = np.zeros((len(q), len(r)), dtype=bool)
            for y in (_halved(references.thumbs[r]), _halved(references.thumbs[r, :, ::-1])):
                squares = (x * x).sum(1)[:, None] + (y * y).sum(1)[None] - 2 * x @ y.T
                close |= squares <= _LEVELS ** 2 * x.shape[1] + 1  # + 1: float32 rounding
            hashes = references.hashes[r]
            distance = np.minimum(*(np.bitwise_count(queries.hashes[q, 0, None] ^ hashes[None, :, k]) for k in (0, 1)))
            i, j = np.nonzero(close & (distance <= threshold))
            yield q[i], r[j], distance[i, j].astype(np.int64)


def _halved(thumbs: np.ndarray) -> np.ndarray:
    n, side = len(thumbs), _THUMB_SIDE // 2
    return thumbs.reshape(n, side, 2, side, 2, 3).mean(axis=(2, 4), dtype=np.float32).reshape(n, -1)


def _confirmed(a: Fingerprints, b: Fingerprints) -> np.ndarray:
    """Whether each pair a[i], b[i] also agrees by thumbnail, straight or mirrored."""
    detailed = np.minimum(a.detail, b.detail) >= _DETAIL
    x, y = a.thumbs.astype(np.float32), b.thumbs.astype(np.float32)
    return _agree(x, y, detailed) | _agree(x, y[:, :, ::-1], detailed)


def _agree(x: np.ndarray, y: np.ndarray, detailed: np.ndarray) -> np.ndarray:
    # Shares are damped in dark cells (+30), where they are noise.
    shares = _rms(x / (x.sum(-1, keepdims=True) + 30) - y / (y.sum(-1, keepdims=True) + 30))
    return (shares <= _SHARES) & (detailed | (_rms(x - y) <= _LEVELS))


def _rms(difference: np.ndarray) -> np.ndarray:
    return np.sqrt((difference ** 2).mean(axis=(1, 2, 3)))


def _within(queries: np.ndarray, references: np.ndarray, threshold: int) -> Iterator[tuple[np.ndarray, ...]]:
    """Batches of (query index, reference index, distance) of every query hash within `threshold`
    bits of a reference's straight or mirrored hash, through the index where it is cheaper."""
    codes = references.T.ravel()  # straight hashes, then mirrored: entry e is reference e % n
    flips = np.flatnonzero(np.bitwise_count(np.arange(1 << _KEY_BITS, dtype=np.uint32)) <= threshold * _KEY_BITS // 64)
    probes = 64 // _KEY_BITS * len(flips)
    search = _probed if probes < len(codes) else _compared  # a probe costs about what a reference does
    for q, entry, d in search(queries, codes, threshold, flips):
        yield q, entry % len(references), d


def _compared(queries: np.ndarray, codes: np.ndarray, threshold: int, flips: np.ndarray) -> Iterator[tuple]:
    """Every pair, in blocks of both queries and references (few references, or a large threshold)."""
    columns = min(max(len(codes), 1), 1 << 13)
    rows = max(1, _BATCH // columns)
    for start in range(0, len(queries), rows):
        for at in range(0, len(codes), columns):
            distance = np.bitwise_count(queries[start:start + rows, None] ^ codes[None, at:at + columns])
            q, e = np.nonzero(distance <= threshold)
            yield q + start, e + at, distance[q, e].astype(np.int64)


def _probed(queries: np.ndarray, codes: np.ndarray, threshold: int, flips: np.ndarray) -> Iterator[tuple]:
    """Multi-index hashing (Norouzi et al., 2012): per key, the buckets within its share of the
    threshold. A pair is yielded by the first key that finds it only."""
    radius, mask = threshold * _KEY_BITS // 64, (1 << _KEY_BITS) - 1
    for key in range(64 // _KEY_BITS):
        shift = np.uint64(key * _KEY_BITS)
        buckets = ((codes >> shift) & np.uint64(mask)).astype(np.int64)
        order = np.argsort(buckets, kind="stable")
        starts = np.searchsorted(buckets[order], np.arange(mask + 2))  # bucket k: order[starts[k]:starts[k + 1]]
        own = ((queries >> shift) & np.uint64(mask)).astype(np.int64)
        for flip in flips:
            bucket = own ^ flip
            for q, pos in _spread(starts[bucket], starts[bucket + 1] - starts[bucket]):
                entry = order[pos]
                differ = queries[q] ^ codes[entry]
                distance = np.bitwise_count(differ).astype(np.int64)
                keep = distance <= threshold
                for earlier in range(key):  # found by an earlier key already
                    part = (differ >> np.uint64(earlier * _KEY_BITS)) & np.uint64(mask)
                    keep &= np.bitwise_count(part) > radius
                yield q[keep], entry[keep], distance[keep]


def _spread(lo: np.ndarray, count: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(query index, position) of every candidate, query i holding positions lo[i] .. lo[i] + count[i],
    about _BATCH at a time."""
    ends = np.cumsum(count)
    if not len(ends) or not ends[-1]:
        return
    cuts = np.unique(np.r_[0, np.searchsorted(ends, np.arange(_BATCH, ends[-1], _BATCH)), len(count)])
    for a, b in zip(cuts[:-1], cuts[1:]):
        n = count[a:b]
        q = np.repeat(np.arange(a, b), n)
        yield q, np.arange(len(q)) + np.repeat(lo[a:b] - (np.cumsum(n) - n), n)
