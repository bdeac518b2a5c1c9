"""Image files on disk, without torch: which files count as images, decoding them to RGB, their
content hashes, and the split CSVs that list them with their labels.

Kept free of torch so that the fetch, split and plot stages start without importing it.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from transferlab.files import atomic_writer

# torchvision's ImageFolder rule (datasets.folder.IMG_EXTENSIONS), copied so that importing this
# module does not import torchvision; tests/test_images.py checks the two agree.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")  # the split stage's CSVs, data/split/NAME.csv


@dataclass(frozen=True)
class Sample:
    path: str   # relative to the project root, e.g. data/raw/train/ants/0013035.jpg
    label: str  # class name


def read_split(path: str | Path) -> list[Sample]:
    """Rows of a split CSV written by the split stage."""
    with open(path, newline="") as f:
        return [Sample(row["path"], row["label"]) for row in csv.DictReader(f)]


def write_split(path: str | Path, samples: list[Sample]) -> None:
    with atomic_writer(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows([s.path, s.label] for s in samples)


def is_image_file(path: str | Path) -> bool:
    """The rule torchvision's ImageFolder applies: a known image extension."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


LOADER_VERSION = 2  # bump when load_image changes what it returns: the caches of decoded images key on it
RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
            "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def load_image(path: str | Path, min_side: int | None = None, resample: str = "bilinear") -> Image.Image:
    """Decode to 8-bit RGB, EXIF rotation applied; if `min_side`, shrink so the short side is that,
    with the model's interpolation, the long side as torchvision's Resize sizes it (truncated).

    Shrinking here means the full-size original (some are 2592x1944) is decoded once, not every
    epoch; JPEG's draft mode even decodes straight to a smaller scale, and an image more than 3x
    the size is first reduced by whole factors (Pillow's reducing_gap): fast, and within a few
    levels of a plain resize. Otherwise the result is a plain Pillow resize, as torchvision's
    (and timm's) eval transforms do it.
    """
    with warnings.catch_warnings():
        # Pillow warns before its decompression-bomb limit: a warning is not a reason to stop.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if min_side and img.format == "JPEG":
                scale = min_side / min(img.size)
                img.draft("RGB", (int(img.width * scale) + 1, int(img.height * scale) + 1))
            img = ImageOps.exif_transpose(img)
            img = to_rgb(img)
    if min_side and min(img.size) > min_side:
        short, long = sorted(img.size)
        size = (min_side, int(min_side * long / short))
        img = img.resize(size if img.width <= img.height else size[::-1], RESAMPLE[resample], reducing_gap=3.0)
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: transparency onto white, 16-bit rescaled, CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(img, dtype=np.float64)
        top = 65535.0 if array.max() > 255 else 255.0
        img = Image.fromarray((array / top * 255).round().astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def file_digest(path: str | Path) -> bytes:
    """sha256 of a file's bytes, computed once per process while the file is unchanged."""
    stat = os.stat(path)
    return _file_sha256(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=None)
def _file_sha256(path: str, mtime_ns: int, size: int) -> bytes:
    # Several caches key on the same images in one process: read and hash each file once.
    return hashlib.sha256(Path(path).read_bytes()).digest()


def samples_digest(samples: list[Sample]) -> str:
    """A hash of the samples' paths, labels and image bytes: a cache key for anything derived from them."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(f"{sample.path}\0{sample.label}\0".encode() + file_digest(sample.path))
    return digest.hexdigest()
