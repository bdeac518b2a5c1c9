"""Decoded images in one memory-mapped file, written as they are decoded.

A store holds every distinct image of a dataset (by content), each decoded to RGB and shrunk so
its short side is `min_side`, back to back in `pixels.bin`, with `index.npy` giving each image's
offset, height, width and CRC-32. Readers map the file, so the kernel's page cache, not the
process, holds the pixels: memory stays flat in the number of images, and every process (the
trainers, evaluate, DataLoader workers, the experiments of a sweep) shares one copy.

Built once, in parallel, with progress; the index is committed every second or so, so an
interrupted build continues where it stopped. Damage heals: a truncated file or an unreadable
index is decoded again from the last good entry, and an image whose CRC does not match is decoded
again from its source and written back, each with one warning. Builders take a lock, so
concurrent experiments build a store once and never read one half-written.
"""
from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from filelock import FileLock
from PIL import Image
from tqdm import tqdm

from transferlab.caches import mark_used
from transferlab.errors import UserError, warn
from transferlab.files import (
    DiskFullError,
    atomic_path,
    disk_full_message,
    free_bytes,
    no_space_message,
    remove_stale_temps,
)
from transferlab.images import LOADER_VERSION, Sample, file_digest, load_image

VERSION = LOADER_VERSION  # what load_image returns (Pillow's own version is in the key too)
INDEX_DTYPE = np.dtype([("offset", "<i8"), ("height", "<i4"), ("width", "<i4"), ("crc", "<u4")])
COMMIT_SECONDS = 1.0


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass(frozen=True)
class StoreKey:
    """Which images a store holds (content digests, sorted), at which size and interpolation."""

    digests: tuple[bytes, ...]
    min_side: int
    resample: str = "bilinear"

    @classmethod
    def of(cls, samples: list[Sample], min_side: int, resample: str = "bilinear") -> StoreKey:
        return cls(tuple(sorted({file_digest(s.path) for s in samples})), min_side, resample)

    @property
    def folder_name(self) -> str:
        # Another Pillow may decode the same file to other bytes: its stores are not this one's.
        decoder = f"v{VERSION}-pillow{PIL.__version__}-{self.min_side}-{self.resample}"
        digest = hashlib.sha256(decoder.encode() + b"".join(self.digests)).hexdigest()
        return f"decoded-{self.min_side}px-{digest[:20]}"


class ImageStore:
    """Read access to a complete store: `image(slot)` is a (height, width, 3) uint8 view."""

    def __init__(self, folder: Path, key: StoreKey, index: np.ndarray):
        self.folder, self.key, self.index = folder, key, index
        self.slots = {digest: slot for slot, digest in enumerate(key.digests)}
        self.verified = np.zeros(len(index), dtype=bool)
        self.redecoded: dict[int, np.ndarray] = {}  # slots whose stored bytes a fresh decode does not match
        self.pixels = self._map()

    def _map(self) -> np.ndarray:
        if self.nbytes == 0:
            return np.zeros(0, np.uint8)
        # Copy-on-write, never written: pages stay shared with the page cache, and torch can wrap it.
        return np.memmap(self.folder / "pixels.bin", dtype=np.uint8, mode="c", shape=(self.nbytes,))

    @property
    def nbytes(self) -> int:
        last = self.index[-1]
        return int(last["offset"]) + int(last["height"]) * int(last["width"]) * 3 if len(self.index) else 0

    def __len__(self) -> int:
        return len(self.index)

    def slot(self, sample: Sample) -> int:
        return self.slots[file_digest(sample.path)]

    def image(self, slot: int, source: str) -> np.ndarray:
        """The decoded image in `slot`; checked against its CRC the first time this process reads it."""
        if not self.verified[slot]:
            mended = self.check(slot, source)
            if mended is not None:
                return mended
        return self._view(slot)

    def _view(self, slot: int) -> np.ndarray:
        entry = self.index[slot]
        start, height, width = int(entry["offset"]), int(entry["height"]), int(entry["width"])
        return self.pixels[start:start + height * width * 3].reshape(height, width, 3)

    def check(self, slot: int, source: str) -> np.ndarray | None:
        """None if `slot`'s bytes match their CRC (from now on they are trusted); else the image
        decoded again from `source`, written back in place when it matches the CRC, so every reader
        sees the mended bytes. One that does not match (the decoder changed since the store was
        built) is kept in this process instead, and the slot is never trusted."""
        if slot in self.redecoded:
            return self.redecoded[slot]
        entry = self.index[slot]
        if zlib.crc32(self._view(slot)) == int(entry["crc"]):
            self.verified[slot] = True
            return None
        warn(f"{self.folder}/pixels.bin: image {slot} ({source}) is damaged; decoded it again from its source")
        fresh = np.ascontiguousarray(load_image(source, self.key.min_side, self.key.resample))
        if fresh.shape[:2] == (entry["height"], entry["width"]) and zlib.crc32(fresh) == int(entry["crc"]):
            with open(self.folder / "pixels.bin", "r+b") as f:
                f.seek(int(entry["offset"]))
                f.write(fresh.tobytes())
            self.verified[slot] = True
        else:
            warn(f"{source} decodes to other bytes than when {self.folder.name} was built; this run uses the "
                 f"new decode (delete the folder to rebuild it)")
            self.redecoded[slot] = fresh
        return fresh

    def __getstate__(self) -> dict:
        # Pickled into DataLoader workers: they map the file themselves instead of copying it.
        return {"folder": self.folder, "key": self.key, "index": self.index}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"], state["key"], state["index"])


def open_store(samples: list[Sample], min_side: int, cache_dir: str | Path, workers: int | None = None,
               resample: str = "bilinear") -> ImageStore:
    """The store of `samples` at `min_side` in `cache_dir`: opened if complete, else built or its
    interrupted build continued, under a lock so concurrent stages build it once."""
    key = StoreKey.of(samples, min_side, resample)
    folder = Path(cache_dir) / key.folder_name
    folder.parent.mkdir(parents=True, exist_ok=True)
    index = _read_complete(folder, key)
    if index is not None:
        mark_used(folder)
        return ImageStore(folder, key, index)
    lock = FileLock(str(folder) + ".lock")
    try:
        lock.acquire(timeout=1)
    except TimeoutError:
        print(f"waiting for another process that is decoding into {folder}", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        remove_stale_temps(folder.parent)
        # Read again under the lock (another process may have finished it), quietly: any damage
        # was reported above.
        index = _read_complete(folder, key, quiet=True)
        if index is None:
            index = _build(folder, key, _sources(samples), workers or cpu_count())
    finally:
        lock.release()
    return ImageStore(folder, key, index)


def _sources(samples: list[Sample]) -> dict[bytes, str]:
    """A path to decode each distinct image from."""
    return {file_digest(s.path): s.path for s in reversed(samples)}


def _read_index(folder: Path, quiet: bool = False) -> np.ndarray:
    path = folder / "index.npy"
    if not path.exists():
        return np.zeros(0, INDEX_DTYPE)
    try:
        index = np.load(path, allow_pickle=False)
        if index.dtype != INDEX_DTYPE:
            raise ValueError(f"unexpected columns {index.dtype}")
        return index
    except Exception as err:  # noqa: BLE001 - any damage means the same: start again
        if not quiet:
            warn(f"{path}: unreadable ({err}); decoding every image again")
        return np.zeros(0, INDEX_DTYPE)


def _read_complete(folder: Path, key: StoreKey, quiet: bool = False) -> np.ndarray | None:
    """The index of a finished, intact store, else None (its build must run or continue)."""
    if not (folder / "index.npy").exists():
        return None
    index = _read_index(folder, quiet)
    if len(index) != len(key.digests):
        return None
    pixels = folder / "pixels.bin"
    end = int(index[-1]["offset"]) + int(index[-1]["height"]) * int(index[-1]["width"]) * 3 if len(index) else 0
    size = pixels.stat().st_size if pixels.exists() else -1
    if size != end:
        if not quiet:
            warn(f"{pixels}: {size} bytes where {end} were written (truncated or damaged); decoding the "
                 f"missing images again")
        return None
    return index


def _committed(folder: Path, index: np.ndarray) -> np.ndarray:
    """The leading entries of `index` whose pixels are all in the file."""
    pixels = folder / "pixels.bin"
    size = pixels.stat().st_size if pixels.exists() else 0
    ends = index["offset"] + index["height"].astype(np.int64) * index["width"] * 3  # increasing
    return index[:int(np.searchsorted(ends, size, side="right"))]


def _build(folder: Path, key: StoreKey, sources: dict[bytes, str], workers: int) -> np.ndarray:
    folder.mkdir(exist_ok=True)
    index = _committed(folder, _read_index(folder, quiet=True))  # open_store reported any damage
    done = len(index)
    pending = [sources[d] for d in key.digests[done:]]
    end = int(index[-1]["offset"]) + int(index[-1]["height"]) * int(index[-1]["width"]) * 3 if done else 0
    pixels = folder / "pixels.bin"
    _check_space(pixels, pending, key.min_side, end)
    if done:
        print(f"{folder}: continuing an interrupted decode after {done} of {len(key.digests)} images", flush=True)
    entries = list(index)
    kept = "the images decoded so far are kept, and the next run continues after them"
    with (open(pixels, "r+b" if pixels.exists() else "wb") as out, no_space_message(pixels, kept=kept),
          contextlib.closing(_decoded(pending, key.min_side, workers, key.resample)) as decoded):
        out.truncate(end)  # drop bytes written after the last commit
        out.seek(end)
        last_commit = time.monotonic()
        try:
            with tqdm(total=len(key.digests), initial=done, unit="img", desc=f"decode {key.min_side}px",
                      disable=None, smoothing=0.1) as bar:
                for array in decoded:
                    out.write(array.tobytes())
                    entries.append((end, array.shape[0], array.shape[1], zlib.crc32(array)))
                    end += array.nbytes
                    bar.update(1)
                    if time.monotonic() - last_commit > COMMIT_SECONDS:
                        _commit(folder, out, entries)
                        last_commit = time.monotonic()
        finally:
            _commit(folder, out, entries)  # interrupted or not: what is written is kept
    return np.array(entries, dtype=INDEX_DTYPE)


def _commit(folder: Path, out, entries: list) -> None:
    """Make the pixels written so far durable, then the index that points at them."""
    out.flush()
    os.fsync(out.fileno())
    with atomic_path(folder / "index.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.array(entries, dtype=INDEX_DTYPE))


def _check_space(pixels: Path, pending: list[str], min_side: int, end: int) -> None:
    """Stop before decoding if the images left cannot fit (sizes from the files' headers)."""
    needed = sum(_decoded_bytes(path, min_side) for path in pending)
    free = free_bytes(pixels.parent) + max(0, (pixels.stat().st_size if pixels.exists() else 0) - end)
    if needed > free:
        raise DiskFullError(disk_full_message(pixels, needed, free))


def _decoded_bytes(path: str, min_side: int) -> int:
    try:
        with Image.open(path) as img:
            width, height = img.size
    except Exception:  # noqa: BLE001 - the decode itself will report it
        return 0
    scale = min(1.0, min_side / min(width, height))
    return round(width * scale) * round(height * scale) * 3


def _decoded(paths: list[str], min_side: int, workers: int, resample: str = "bilinear"):
    """Decoded images of `paths`, in order; on `workers` processes when there is enough to share."""
    if workers <= 1 or len(paths) < 64:
        for path in paths:
            yield _decode_one((path, min_side, resample))
        return
    # spawn, not fork: the parent may hold torch's threads, which a forked child would inherit broken.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_ignore_interrupts) as pool:
        yield from pool.imap(_decode_one, [(path, min_side, resample) for path in paths], chunksize=16)


def _decode_one(job: tuple[str, int, str]) -> np.ndarray:
    path, min_side, resample = job
    try:
        return np.ascontiguousarray(load_image(path, min_side, resample))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        # The split stage checked every image; one that fails now changed on disk since.
        raise UserError(f"{path}: fails to decode ({err}); it changed since the split stage checked it: "
                        f"run dvc repro") from None


def _ignore_interrupts() -> None:
    # Ctrl-C reaches the whole process group; the parent alone decides what to keep, then stops them.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def store_folders(cache_dir: str | Path) -> list[Path]:
    return sorted(Path(cache_dir).glob("decoded-*px-*"))
