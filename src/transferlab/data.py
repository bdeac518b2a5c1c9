"""Decoded images -> tensors: the decode cache, per-model transforms, datasets and loaders."""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from transferlab.errors import UserError
from transferlab.files import atomic_path
from transferlab.images import Sample, file_digest, load_image
from transferlab.models import Preprocess


def build_transform(pre: Preprocess, train: bool) -> T.Compose:
    """The tutorial's augmentation for training, resize + centre crop for evaluation."""
    interpolation = T.InterpolationMode(pre.interpolation)
    if train:
        steps = [T.RandomResizedCrop(pre.crop_size, interpolation=interpolation), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(pre.resize_size, interpolation=interpolation), T.CenterCrop(pre.crop_size)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(pre.mean, pre.std)])


def decode_all(samples: list[Sample], min_side: int, cache_dir: str | Path | None = None) -> list[np.ndarray]:
    """Every sample decoded and shrunk, as uint8 HxWx3 arrays.

    With `cache_dir`, the result is stored there under a key made of the images' bytes and
    `min_side`, so the three training stages and evaluate decode each image once between them.
    """
    if cache_dir is None:
        return [np.asarray(load_image(s.path, min_side)) for s in samples]
    key = hashlib.sha256(f"v{_CACHE_VERSION}-{min_side}-{samples_digest(samples)}".encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"decoded-{min_side}px-{key}.npz"
    if path.exists():
        with np.load(path) as stored:
            pixels, shapes = stored["pixels"], stored["shapes"]
        ends = np.cumsum([h * w * 3 for h, w in shapes])
        return [chunk.reshape(h, w, 3) for chunk, (h, w) in zip(np.split(pixels, ends[:-1]), shapes)]
    images = decode_all(samples, min_side)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, pixels=np.concatenate([a.reshape(-1) for a in images]),
                 shapes=np.array([a.shape[:2] for a in images]))
    return images


_CACHE_VERSION = 1  # bump when load_image changes what it returns


def samples_digest(samples: list[Sample]) -> str:
    """A hash of the samples' paths, labels and image bytes: a cache key for anything derived from them."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(f"{sample.path}\0{sample.label}\0".encode() + file_digest(sample.path))
    return digest.hexdigest()


class ImageDataset(Dataset):
    """Samples with integer labels. Every image is decoded and shrunk up front (through the cache
    in `cache_dir`, if given), so epochs never touch the original files."""

    def __init__(self, samples: list[Sample], classes: list[str], transform, min_side: int | None = None,
                 cache_dir: str | Path | None = None):
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted({s.label for s in samples} - set(index))
        if unknown:
            raise UserError(f"labels {unknown} of the images to read are not among the model's classes "
                            f"{classes}: the split changed after the model was trained; run dvc repro")
        self.samples = samples
        self.targets = [index[s.label] for s in samples]
        self.transform = transform
        self.images = decode_all(samples, min_side, cache_dir)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), self.targets[i]


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader whose shuffling and worker augmentations are fixed by `seed`.

    Workers are not persistent: each epoch's are seeded afresh from the loader's generator, so a
    run resumed after epoch k augments epoch k+1 exactly as an uninterrupted run does.
    """
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      pin_memory=pin_memory,
                      worker_init_fn=_seed_worker, generator=torch.Generator().manual_seed(seed))


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random must follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
