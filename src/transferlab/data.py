"""Decoded images -> batches, two ways that give the same distribution of inputs:

- `ImageDataset` + `make_loader`: the tutorial's torchvision transforms on PIL images, one image
  at a time, in a DataLoader;
- `TensorBatches`: the same augmentation (RandomResizedCrop's scale and ratio draws, bilinear
  antialiased resize, horizontal flip, normalisation) done on tensors where they live: images
  uploaded once to the GPU, or read straight from the memory-mapped store on a CPU. No worker
  processes, and one generator per loader, so a seed fixes every draw and resume is exact.

Which one trains is measured per machine (hardware.py). Both read the decoded images from the
store (store.py): the original files are never opened again.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    default_collate,
)

from transferlab.distributed import SINGLE, World
from transferlab.errors import UserError
from transferlab.hardware import Hardware
from transferlab.images import SPLITS, Sample, read_split
from transferlab.models import Preprocess
from transferlab.store import ImageStore, open_store

# torchvision's RandomResizedCrop defaults, which the tutorial uses.
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
# Decoded images stay on a GPU when they take at most this share of its memory; beyond, they are
# sent batch by batch from the memory-mapped store.
GPU_SHARE_FOR_IMAGES = 0.25


def read_splits(split_dir: Path) -> dict[str, list[Sample]]:
    return {name: read_split(Path(split_dir) / f"{name}.csv") for name in SPLITS}


def open_split_store(split_dir: Path, min_side: int, cache_dir: Path) -> ImageStore:
    """The store of every image of train, val and test, as the decode stage built it: the trainers
    and evaluate open the same one (and rebuild it, with progress, if it was deleted)."""
    return open_store([s for samples in read_splits(split_dir).values() for s in samples], min_side, cache_dir)


class ImageSource:
    """The store, and once asked for, its images as tensors on the device (uploaded once)."""

    def __init__(self, store: ImageStore):
        self.store, self._device_images = store, None

    def device_images(self, device: torch.device) -> DeviceImages:
        if self._device_images is None:
            budget = 0
            if device.type == "cuda":
                budget = int(torch.cuda.get_device_properties(device).total_memory * GPU_SHARE_FOR_IMAGES)
            self._device_images = DeviceImages(self.store, device, budget)
        return self._device_images

    def batches(self, samples: list[Sample], classes: list[str], pre: Preprocess, batch_size: int, train: bool,
                seed: int, hw: Hardware, tensor_batches: bool | None = None, world: World = SINGLE,
                shuffle: bool | None = None):
        """Batches of one split, augmented and shuffled if `train` (shuffle=False: augmented, in the
        samples' order): tensor batches or a DataLoader over PIL transforms, as `hw` says; with
        several processes, this one's share of each."""
        shuffle = train if shuffle is None else shuffle
        if hw.tensor_batches if tensor_batches is None else tensor_batches:
            return TensorBatches(self.device_images(hw.device), samples, classes, pre, batch_size, train, seed,
                                 world, shuffle)
        dataset = ImageDataset(samples, classes, build_transform(pre, train), self.store)
        return make_loader(dataset, batch_size, shuffle, seed, hw.workers, hw.pin_memory, world)


def label_indices(samples: list[Sample], classes: list[str]) -> list[int]:
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({s.label for s in samples} - set(index))
    if unknown:
        raise UserError(f"labels {unknown} of the images to read are not among the model's classes "
                        f"{classes}: the split changed after the model was trained; run dvc repro")
    return [index[s.label] for s in samples]


def build_transform(pre: Preprocess, train: bool) -> Callable:
    """The tutorial's augmentation for training, resize + centre crop for evaluation."""
    from torchvision import transforms as T  # here: the tensor-batch path needs no torchvision

    interpolation = T.InterpolationMode(pre.interpolation)
    if train:
        steps = [T.RandomResizedCrop(pre.crop_size, SCALE, RATIO, interpolation=interpolation),
                 T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(pre.resize_size, interpolation=interpolation), T.CenterCrop(pre.crop_size)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(pre.mean, pre.std)])


class ImageDataset(Dataset):
    """Samples with integer labels, read from the decoded-image store."""

    def __init__(self, samples: list[Sample], classes: list[str], transform, store: ImageStore):
        self.samples, self.transform, self.store = samples, transform, store
        self.targets = label_indices(samples, classes)
        self.slots = [store.slot(s) for s in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, i: int) -> np.ndarray:
        return self.store.image(self.slots[i], self.samples[i].path)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.image(i))), self.targets[i]


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, workers: int = 0,
                pin_memory: bool = False, world: World = SINGLE) -> DataLoader:
    """A DataLoader whose shuffling and worker augmentations are fixed by `seed`; with several
    processes, each loads its share of every batch (all shuffle alike).

    Workers are not persistent: each epoch's are seeded afresh from the loader's generator, so a
    run resumed after epoch k augments epoch k+1 exactly as an uninterrupted run does.
    """
    generator = torch.Generator().manual_seed(seed)
    order = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    return DataLoader(dataset, batch_sampler=ShareOfBatches(BatchSampler(order, batch_size, False), world),
                      num_workers=workers, pin_memory=pin_memory, worker_init_fn=_seed_worker, generator=generator,
                      collate_fn=collate_share)


def collate_share(batch: list):
    """DataLoader's default collation; for an empty share of a batch, empty tensors (the loop
    skips them, or stands in for them while training)."""
    return default_collate(batch) if batch else (torch.zeros(0), torch.zeros(0, dtype=torch.long))


class ShareOfBatches(Sampler):
    """This process's share of every batch: as many steps as one process takes, each on a part."""

    def __init__(self, batches: BatchSampler, world: World):
        self.batches, self.world = batches, world

    def __iter__(self):
        for batch in self.batches:
            yield batch[self.world.shard(len(batch))]

    def __len__(self) -> int:
        return len(self.batches)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random must follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def crop_boxes(heights: torch.Tensor, widths: torch.Tensor, generator: torch.Generator,
               scale=SCALE, ratio=RATIO) -> torch.Tensor:
    """RandomResizedCrop.get_params for a batch: (top, left, height, width) per image, drawn the
    same way (ten tries of area and log-uniform aspect, else the central crop), from `generator`."""
    n = len(heights)
    area = (heights * widths).double()[:, None]
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, 10, generator=generator, dtype=torch.float64))
    low, high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(low + (high - low) * torch.rand(n, 10, generator=generator, dtype=torch.float64))
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    first = fits.long().argmax(1)
    rows = torch.arange(n)
    w, h = w[rows, first], h[rows, first]
    # No try fitted: the central crop of the aspect ratio clamped to `ratio` (torchvision's fallback).
    in_ratio = widths.double() / heights.double()
    fallback_w = torch.where(in_ratio < ratio[0], widths, torch.where(
        in_ratio > ratio[1], torch.round(heights * ratio[1]).long(), widths))
    fallback_h = torch.where(in_ratio < ratio[0], torch.round(widths / ratio[0]).long(), heights)
    found = fits.any(1)
    w, h = torch.where(found, w, fallback_w), torch.where(found, h, fallback_h)
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.where(found, (u[:, 0] * (heights - h + 1)).long(), (heights - h) // 2)
    left = torch.where(found, (u[:, 1] * (widths - w + 1)).long(), (widths - w) // 2)
    return torch.stack([top, left, h, w], 1)


class DeviceImages:
    """The store's images as tensors on `device`: uploaded once when they fit `budget_bytes`,
    otherwise (and on a CPU) read from the memory-mapped file batch by batch."""

    def __init__(self, store: ImageStore, device: torch.device, budget_bytes: int = 0):
        self.store, self.device = store, device
        self.index = store.index
        flat = torch.from_numpy(np.asarray(store.pixels)) if store.nbytes else torch.zeros(0, dtype=torch.uint8)
        self.resident = device.type != "cpu" and store.nbytes <= budget_bytes
        self.flat = flat.to(device) if self.resident else flat

    def image(self, slot: int, source: str) -> torch.Tensor:
        """(3, height, width) uint8 on the device; checked against its CRC the first time it is read,
        on the host, like every read from the store (a mended image replaces the uploaded one)."""
        if not self.resident:
            array = self.store.image(slot, source)
            return torch.from_numpy(array).to(self.device, non_blocking=True).permute(2, 0, 1)
        entry = self.index[slot]
        start, h, w = int(entry["offset"]), int(entry["height"]), int(entry["width"])
        if not self.store.verified[slot]:
            mended = self.store.check(slot, source)
            if mended is not None and self.store.verified[slot]:  # mended in the file: and in the upload
                self.flat[start:start + h * w * 3] = torch.from_numpy(mended.reshape(-1)).to(self.device)
            elif mended is not None:  # decodes differently now: this process uses the fresh decode
                return torch.from_numpy(mended).to(self.device).permute(2, 0, 1)
        return self.flat[start:start + h * w * 3].view(h, w, 3).permute(2, 0, 1)


class TensorBatches:
    """Batches of (normalised images, targets) on the device, for one split; iterate once per epoch.

    Training batches are shuffled (unless shuffle=False) and augmented from `generator` (order,
    crop boxes, flips); evaluation batches are resized and centre-cropped as torchvision's Resize +
    CenterCrop do. With several processes, each draws for the whole batch (so all stay in step, and
    the batch is the one a single process would see) and crops its share.
    """

    def __init__(self, images: DeviceImages, samples: list[Sample], classes: list[str], pre: Preprocess,
                 batch_size: int, train: bool, seed: int = 0, world: World = SINGLE, shuffle: bool | None = None):
        self.images, self.samples, self.pre, self.batch_size, self.train = images, samples, pre, batch_size, train
        self.shuffle = train if shuffle is None else shuffle
        self.world = world
        self.slots = [images.store.slot(s) for s in samples]
        self.targets = torch.tensor(label_indices(samples, classes))
        self.generator = torch.Generator().manual_seed(seed)
        device = images.device
        self.mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1) * 255
        self.targets_on_device = self.targets.to(device)
        shapes = images.index[self.slots]
        self.heights = torch.from_numpy(shapes["height"].astype(np.int64))
        self.widths = torch.from_numpy(shapes["width"].astype(np.int64))

    def __len__(self) -> int:
        return -(-len(self.samples) // self.batch_size)

    def __iter__(self):
        n = len(self.samples)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            rows = order[start:start + self.batch_size]
            boxes, flips = self.draw(rows) if self.train else ([None] * len(rows), [False] * len(rows))
            share = self.world.shard(len(rows))
            rows = rows[share]
            targets = self.targets_on_device[rows.to(self.targets_on_device.device)]
            yield self.batch(rows, boxes[share], flips[share]), targets

    def draw(self, rows: torch.Tensor) -> tuple[list, list]:
        """The random crop box and flip of each row (RandomResizedCrop, RandomHorizontalFlip)."""
        boxes = crop_boxes(self.heights[rows], self.widths[rows], self.generator).tolist()
        flips = (torch.rand(len(rows), generator=self.generator) < 0.5).tolist()
        return boxes, flips

    def batch(self, rows: torch.Tensor, boxes: list, flips: list) -> torch.Tensor:
        crops = [self.crop(int(r), box, flip) for r, box, flip in zip(rows, boxes, flips)]
        if not crops:  # this process's share of a last batch smaller than the number of processes
            return torch.zeros(0, 3, self.pre.crop_size, self.pre.crop_size, device=self.mean.device)
        return (torch.cat(crops) - self.mean) / self.std

    def crop(self, row: int, box, flip: bool) -> torch.Tensor:
        """One image as a (1, 3, crop, crop) float tensor, 0-255, augmented or centre-cropped."""
        image = self.images.image(self.slots[row], self.samples[row].path)
        size, mode = self.pre.crop_size, self.pre.interpolation
        if box is not None:
            top, left, h, w = box
            out = resize(image[:, top:top + h, left:left + w], (size, size), mode)
            return out.flip(-1) if flip else out
        h, w = image.shape[1:]
        short = self.pre.resize_size
        if min(h, w) != short:  # the store keeps originals smaller than the resize at their size
            h, w = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
            image = resize(image, (h, w), mode)[0]
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        return image[None, :, top:top + size, left:left + size].float()


def resize(image: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(3, h, w) -> (1, 3, *size) float, antialiased as torchvision resizes tensors."""
    antialias = mode in ("bilinear", "bicubic")
    return F.interpolate(image[None].float(), size=size, mode=mode, antialias=antialias,
                         align_corners=False if antialias else None)
