"""Decoded images -> batches, two ways that give the same distribution of inputs:

- `ImageDataset` + `make_loader`: the tutorial's torchvision transforms on PIL images, one image
  at a time, in a DataLoader;
- `TensorBatches`: the same augmentation (RandomResizedCrop's scale and ratio draws, bilinear
  antialiased resize, horizontal flip, normalisation) done on tensors where they live: on a CPU
  image by image, straight from the memory-mapped store; on an accelerator in one batched
  computation per batch, from the images of the split uploaded once (when they fit) or gathered
  batch by batch, ahead, on a thread of their own, and sent from pinned memory without waiting.
  No worker processes, and one generator per loader, so a seed fixes every draw and resume is exact.

Both can add a stronger policy to training images (train.augment: recipes.augmenter), on the
uint8 crop before its normalisation, each image seeded from the generator its crop drew from.

Which one trains is measured per machine (hardware.py). Both read the decoded images from the
store (store.py): the original files are never opened again.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
from transferlab.errors import UserError, warn
from transferlab.hardware import Hardware, residency_budget
from transferlab.images import SPLITS, Sample, read_split
from transferlab.models import Preprocess
from transferlab.recipes import augmenter
from transferlab.store import ImageStore, open_store

# torchvision's RandomResizedCrop defaults, which the tutorial uses.
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
# An upload to the device goes in pieces of about this size: one host copy and one transfer each.
UPLOAD_CHUNK_BYTES = 64 << 20


def read_splits(split_dir: Path) -> dict[str, list[Sample]]:
    return {name: read_split(Path(split_dir) / f"{name}.csv") for name in SPLITS}


def open_split_store(split_dir: Path, min_side: int, cache_dir: Path, resample: str = "bilinear") -> ImageStore:
    """The store of every image of train, val and test, as the decode stage built it (at the
    model's resize and interpolation): the trainers and evaluate open the same one (and rebuild
    it, with progress, if it was deleted)."""
    return open_store([s for samples in read_splits(split_dir).values() for s in samples], min_side, cache_dir,
                      resample=resample)


class ImageSource:
    """The store, and once asked for, the images of what a stage reads as tensors on the device."""

    def __init__(self, store: ImageStore):
        self.store, self._on_device = store, []

    def device_images(self, device: torch.device, samples: list[Sample] | None = None,
                      pin_memory: bool = False) -> DeviceImages:
        """The images of `samples` (all the store's if None) on `device`: an upload that holds
        them is reused; else they are uploaded, only they, when they fit the device's residency
        budget (hardware.residency_budget), or streamed from the store batch by batch."""
        slots = None if samples is None else np.unique([self.store.slot(s) for s in samples])
        for images in self._on_device:
            if images.device == device and images.holds(slots):
                return images
        images = DeviceImages(self.store, device, residency_budget(device), slots, pin_memory)
        self._on_device.append(images)
        return images

    def batches(self, samples: list[Sample], classes: list[str], pre: Preprocess, batch_size: int, train: bool,
                seed: int, hw: Hardware, tensor_batches: bool | None = None, world: World = SINGLE,
                shuffle: bool | None = None, augment: str = "none"):
        """Batches of one split, augmented and shuffled if `train` (shuffle=False: augmented, in the
        samples' order; `augment`: a stronger policy too, recipes.AUGMENTATIONS): tensor batches
        or a DataLoader over PIL transforms, as `hw` says; with several processes, this one's
        share of each."""
        shuffle = train if shuffle is None else shuffle
        if hw.tensor_batches if tensor_batches is None else tensor_batches:
            return TensorBatches(self.device_images(hw.device, samples, hw.pin_memory), samples, classes, pre,
                                 batch_size, train, seed, world, shuffle, hw.channels_last, augment=augment)
        dataset = ImageDataset(samples, classes, build_transform(pre, train, augment), self.store)
        return make_loader(dataset, batch_size, shuffle, seed, hw.workers, hw.pin_memory, world)


def label_indices(samples: list[Sample], classes: list[str]) -> list[int]:
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({s.label for s in samples} - set(index))
    if unknown:
        raise UserError(f"labels {unknown} of the images to read are not among the model's classes "
                        f"{classes}: the split changed after the model was trained; run dvc repro")
    return [index[s.label] for s in samples]


def build_transform(pre: Preprocess, train: bool, augment: str = "none") -> Callable:
    """The tutorial's augmentation for training (and `augment`'s policy on the uint8 crop, as
    torchvision's references place it), resize + centre crop for evaluation."""
    from torchvision import transforms as T  # here: the tensor-batch path needs no torchvision

    interpolation = T.InterpolationMode(pre.interpolation)
    if train:
        steps = [T.RandomResizedCrop(pre.crop_size, SCALE, RATIO, interpolation=interpolation),
                 T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(pre.resize_size, interpolation=interpolation), T.CenterCrop(pre.crop_size)]
    if train and augment != "none":  # ToTensor's scaling, split around the policy
        steps += [T.PILToTensor(), SeededAugment(augment), T.ConvertImageDtype(torch.float32)]
    else:
        steps += [T.ToTensor()]
    return T.Compose(steps + [T.Normalize(pre.mean, pre.std)])


class SeededAugment:
    """recipes.augmenter's policy as a step of the PIL path, each image seeded from torch's
    generator, as that path's crops and flips draw: a worker's, seeded each epoch from the
    loader's generator; without workers, the process's. fit saves both: resume is exact."""

    def __init__(self, name: str):
        self.augment = augmenter(name, 0)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.augment(image, int(torch.randint(2**62, ())))


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
    """Decoded images for tensor batches: those of `slots` (all the store's if None) uploaded to
    `device` once when they fit `budget_bytes`, and when the device then has the room (if not, a
    warning, and streaming); otherwise, and always on a CPU, read from the memory-mapped store
    batch by batch. Every image is checked against its CRC the first time it is read, on the host,
    like every read from the store (a mended image replaces the uploaded one)."""

    def __init__(self, store: ImageStore, device: torch.device, budget_bytes: int = 0,
                 slots: np.ndarray | None = None, pin_memory: bool = False):
        self.store, self.device, self.index, self.pin_memory = store, device, store.index, pin_memory
        self.slots = np.arange(len(store)) if slots is None else np.asarray(slots, dtype=np.int64)
        self.flat = torch.from_numpy(np.asarray(store.pixels)) if store.nbytes else torch.zeros(0, dtype=torch.uint8)
        self.starts = store.index["offset"].astype(np.int64)  # each image's first byte in `flat`
        sizes = self.index["height"][self.slots].astype(np.int64) * self.index["width"][self.slots] * 3
        nbytes = int(sizes.sum())
        self.resident = device.type != "cpu" and nbytes <= budget_bytes and self._upload(sizes, nbytes)

    def holds(self, slots: np.ndarray | None) -> bool:
        """Whether these images (all the store's if None) come from here: uploaded, or streamed
        for the same request."""
        if slots is None:
            return len(self.slots) == len(self.store)
        return bool(np.isin(slots, self.slots).all()) if self.resident else np.array_equal(slots, self.slots)

    def _upload(self, sizes: np.ndarray, nbytes: int) -> bool:
        try:
            flat = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        except torch.OutOfMemoryError:  # another process took the room since the budget was read
            warn(f"{nbytes / 2**20:.0f} MB of decoded images do not fit on {self.device} now (out of memory): "
                 f"sending them batch by batch from the memory-mapped store instead")
            return False
        for first, piece in _pieces(self.store, self.slots):
            flat[first:first + len(piece)].copy_(torch.from_numpy(piece))
        self.starts[self.slots] = np.cumsum(sizes) - sizes
        self.flat = flat
        return True

    def image(self, slot: int, source: str) -> torch.Tensor:
        """(3, height, width) uint8 on the device, checked the first time it is read."""
        if not self.resident:
            return torch.from_numpy(self.store.image(slot, source)).to(self.device).permute(2, 0, 1)
        entry = self.index[slot]
        start, h, w = int(self.starts[slot]), int(entry["height"]), int(entry["width"])
        if not self.store.verified[slot]:
            mended = self.store.check(slot, source)
            if mended is not None and self.store.verified[slot]:  # mended in the file: and in the upload
                self.flat[start:start + h * w * 3] = torch.from_numpy(mended.reshape(-1)).to(self.device)
            elif mended is not None:  # decodes differently now: this process uses the fresh decode
                return torch.from_numpy(mended).to(self.device).permute(2, 0, 1)
        return self.flat[start:start + h * w * 3].view(h, w, 3).permute(2, 0, 1)

    def gather(self, slots: np.ndarray, sources: list[str]) -> tuple[torch.Tensor | None, np.ndarray, list]:
        """The host's part of a batch, done ahead on another thread: each image checked the first
        time; streamed, all of them copied into one buffer, pinned where transfers are. Returns
        (that buffer, or None when uploaded; each image's first byte; mended images to upload)."""
        if self.resident:
            mended = [(slot, self._checked(slot, source)) for slot, source in zip(slots, sources)
                      if not self.store.verified[slot]]
            return None, self.starts[slots], [(slot, array) for slot, array in mended if array is not None]
        arrays = [self._checked(slot, source, self.store.image(slot, source)) for slot, source in zip(slots, sources)]
        sizes = np.array([a.size for a in arrays], dtype=np.int64)
        pixels = torch.from_numpy(np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, np.uint8))
        return pixels.pin_memory() if self.pin_memory else pixels, np.cumsum(sizes) - sizes, []

    def _checked(self, slot: int, source: str, array: np.ndarray | None = None) -> np.ndarray | None:
        """`array` (by default, a fresh decode if the stored bytes did not match their CRC), which
        must have the stored shape: the crop boxes were drawn from it."""
        array = self.store.check(slot, source) if array is None else array
        if array is not None and array.shape[:2] != (self.index[slot]["height"], self.index[slot]["width"]):
            raise UserError(f"{source} now decodes to {array.shape[1]}x{array.shape[0]} pixels, not the "
                            f"{self.index[slot]['width']}x{self.index[slot]['height']} of {self.store.folder}: "
                            f"delete that folder to rebuild it")
        return array

    def send(self, gathered: tuple[torch.Tensor | None, np.ndarray, list]) -> torch.Tensor:
        """The pixels of a gathered batch on the device (copied without waiting, from pinned memory)."""
        pixels, _, mended = gathered
        for slot, array in mended:  # rare (a damaged store): a plain copy
            start = int(self.starts[slot])
            self.flat[start:start + array.size] = torch.from_numpy(array.reshape(-1)).to(self.device)
        return self.flat if pixels is None else pixels.to(self.device, non_blocking=self.pin_memory)


def _pieces(store: ImageStore, slots: np.ndarray):
    """(first byte in the upload, the pixels of consecutive `slots`), about UPLOAD_CHUNK_BYTES each."""
    parts, size, first = [], 0, 0
    for slot in slots:
        entry = store.index[slot]
        start = int(entry["offset"])
        parts.append(store.pixels[start:start + int(entry["height"]) * int(entry["width"]) * 3])
        size += len(parts[-1])
        if size >= UPLOAD_CHUNK_BYTES:
            yield first, np.concatenate(parts)
            parts, size, first = [], 0, first + size
    if parts:
        yield first, np.concatenate(parts)


class TensorBatches:
    """Batches of (normalised images, targets) on the device, for one split; iterate once per epoch.

    Training batches are shuffled (unless shuffle=False) and augmented from `generator` (order,
    crop boxes, flips); evaluation batches are resized and centre-cropped as torchvision's Resize +
    CenterCrop do. With several processes, each draws for the whole batch (so all stay in step, and
    the batch is the one a single process would see) and crops its share.

    On a CPU each image is cropped and resized on its own (F.interpolate, the reference); on an
    accelerator (or with batched=True) a batch is one computation (`resample`, bilinear: other
    interpolations stay one by one) whatever its size, made in the layout the model runs in,
    while the next batch's images are gathered on a thread.
    """

    def __init__(self, images: DeviceImages, samples: list[Sample], classes: list[str], pre: Preprocess,
                 batch_size: int, train: bool, seed: int = 0, world: World = SINGLE, shuffle: bool | None = None,
                 channels_last: bool = False, batched: bool | None = None, augment: str = "none"):
        self.images, self.samples, self.pre, self.batch_size, self.train = images, samples, pre, batch_size, train
        self.augment = augmenter(augment, seed) if train else None  # each image seeded from `generator`
        self.shuffle = train if shuffle is None else shuffle
        self.world, self.channels_last = world, channels_last
        self.batched = images.device.type != "cpu" and pre.interpolation == "bilinear" if batched is None else batched
        self.slots = [images.store.slot(s) for s in samples]
        assert not images.resident or images.holds(np.unique(self.slots)), "images uploaded for other samples"
        self.targets = torch.tensor(label_indices(samples, classes))
        self.generator = torch.Generator().manual_seed(seed)
        device = images.device
        self.mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1) * 255
        self.targets_on_device = self.targets.to(device)
        shapes = images.index[self.slots]
        self.heights = torch.from_numpy(shapes["height"].astype(np.int64))
        self.widths = torch.from_numpy(shapes["width"].astype(np.int64))
        # Resize + CenterCrop of each image, for `resample`: (resized height, width, top, left).
        self.centres = None if train or not self.batched else torch.tensor(
            [centre_window(int(h), int(w), pre.resize_size, pre.crop_size) for h, w in zip(self.heights, self.widths)],
            dtype=torch.long).view(-1, 4)

    def __len__(self) -> int:
        return -(-len(self.samples) // self.batch_size)

    def __iter__(self):
        n = len(self.samples)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        batches = [order[start:start + self.batch_size] for start in range(0, n, self.batch_size)]
        yield from (self._batched(batches) if self.batched else self._one_by_one(batches))

    def _one_by_one(self, batches: list[torch.Tensor]):
        for rows in batches:
            boxes, flips = self.draw(rows) if self.train else ([None] * len(rows), [False] * len(rows))
            seeds = self._seeds(rows)
            share = self.world.shard(len(rows))
            rows = rows[share]
            targets = self.targets_on_device[rows.to(self.targets_on_device.device)]
            yield self.batch(rows, boxes[share], flips[share], None if seeds is None else seeds[share]), targets

    def _batched(self, batches: list[torch.Tensor]):
        shares = [rows[self.world.shard(len(rows))] for rows in batches]
        with ThreadPoolExecutor(1, thread_name_prefix="transferlab-gather") as gatherer:
            ahead = [gatherer.submit(self._gather, rows) for rows in shares[:1]]
            for i, rows in enumerate(batches):
                boxes, flips = self._draws(rows) if self.train else (None, None)
                seeds = self._seeds(rows)
                share = self.world.shard(len(rows))
                gathered = ahead.pop().result()
                ahead += [gatherer.submit(self._gather, shares[i + 1])] if i + 1 < len(batches) else []
                pixels = self.images.send(gathered)
                plan = self._plan(shares[i], gathered[1], None if boxes is None else boxes[share],
                                  None if flips is None else flips[share])
                yield self._resampled(pixels, plan, None if seeds is None else seeds[share])

    def _gather(self, rows: torch.Tensor):
        rows = rows.tolist()
        return self.images.gather(np.array([self.slots[r] for r in rows], dtype=np.int64),
                                  [self.samples[r].path for r in rows])

    def _plan(self, rows: torch.Tensor, starts: np.ndarray, boxes: torch.Tensor | None,
              flips: torch.Tensor | None) -> torch.Tensor:
        """The host's description of a batch for `resample`, one row of PLAN per image: where its
        pixels start, its width, the window read, the size it is resized to, the offset of the
        square kept, whether it is flipped, and which target."""
        h, w = self.heights[rows], self.widths[rows]
        zero, size = torch.zeros_like(h), torch.full_like(h, self.pre.crop_size)
        if boxes is not None:  # RandomResizedCrop: the box, resized to the square
            window, resized, offset = boxes.unbind(1), (size, size), (zero, zero)
        else:  # Resize + CenterCrop: the whole image, resized by its short side, its centre kept
            window, (rh, rw, top, left) = (zero, zero, h, w), self.centres[rows].unbind(1)
            resized, offset = (rh, rw), (top, left)
        flip = zero if flips is None else flips.long()
        return torch.stack([torch.from_numpy(starts // 3), w, *window, *resized, *offset, flip, rows], 1)

    def _resampled(self, pixels: torch.Tensor, plan: torch.Tensor,
                   seeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        size, device = self.pre.crop_size, self.mean.device
        if not len(plan):  # this process's share of a last batch smaller than the number of processes
            return torch.zeros(0, 3, size, size, device=device), self.targets_on_device[:0]
        spans = (int(plan[:, PLAN.index("window_h")].max()), int(plan[:, PLAN.index("window_w")].max()))
        plan = (plan.pin_memory() if self.images.pin_memory else plan).to(device, non_blocking=self.images.pin_memory)
        images = resample(pixels, plan, size, spans, self.pre.interpolation)
        if seeds is not None:
            images = torch.cat([self.augmented(image[None], seed) for image, seed in zip(images, seeds.tolist())])
        # Normalised straight into the layout the model runs in: no copy per step to change it.
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        normalised = torch.sub(images, self.mean, out=torch.empty_like(images, memory_format=layout))
        return normalised.div_(self.std), self.targets_on_device[plan[:, PLAN.index("row")]]

    def draw(self, rows: torch.Tensor) -> tuple[list, list]:
        """The random crop box and flip of each row (RandomResizedCrop, RandomHorizontalFlip)."""
        boxes, flips = self._draws(rows)
        return boxes.tolist(), flips.tolist()

    def _draws(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        boxes = crop_boxes(self.heights[rows], self.widths[rows], self.generator)
        return boxes, torch.rand(len(rows), generator=self.generator) < 0.5

    def _seeds(self, rows: torch.Tensor) -> torch.Tensor | None:
        """Each row's seed for the augmentation policy (None without one), drawn after its crop and
        flip from the same generator: resume restores it, and every process draws the whole batch's."""
        return None if self.augment is None else torch.randint(2**62, (len(rows),), generator=self.generator)

    def augmented(self, crop: torch.Tensor, seed: int) -> torch.Tensor:
        """A (1, 3, s, s) float 0-255 crop through the policy, which takes uint8, as the PIL path's
        rounded crop is."""
        return self.augment(crop[0].round().clamp(0, 255).to(torch.uint8), int(seed))[None].float()

    def batch(self, rows: torch.Tensor, boxes: list, flips: list, seeds: torch.Tensor | None = None) -> torch.Tensor:
        crops = [self.crop(int(r), box, flip) for r, box, flip in zip(rows, boxes, flips)]
        if seeds is not None:
            crops = [self.augmented(crop, seed) for crop, seed in zip(crops, seeds.tolist())]
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
        h, w, top, left = centre_window(*image.shape[1:], self.pre.resize_size, size)
        if (h, w) != tuple(image.shape[1:]):
            image = resize(image, (h, w), mode)[0]
        return image[None, :, top:top + size, left:left + size].float()


def centre_window(h: int, w: int, short: int, size: int) -> tuple[int, int, int, int]:
    """(height, width) after torchvision's Resize(short) and the (top, left) of CenterCrop(size)
    in it. The store keeps originals smaller than the resize at their size: those are resized."""
    if min(h, w) != short:
        h, w = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    return h, w, int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def resize(image: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(3, h, w) -> (1, 3, *size) float, antialiased as torchvision resizes tensors."""
    antialias = mode in ("bilinear", "bicubic")
    return F.interpolate(image[None].float(), size=size, mode=mode, antialias=antialias,
                         align_corners=False if antialias else None)


# The columns of a batch's plan (TensorBatches._plan): pixel offsets, in pixels of 3 bytes.
PLAN = ("start", "width", "window_top", "window_left", "window_h", "window_w", "resized_h", "resized_w",
        "top", "left", "flip", "row")


def resample(pixels: torch.Tensor, plan: torch.Tensor, size: int, spans: tuple[int, int],
             mode: str = "bilinear") -> torch.Tensor:
    """Each image's window, resized to its `resized` size as F.interpolate(antialias=True) resizes
    (one weight matrix per axis and image), of which the size x size square at (top, left) is kept,
    flipped where asked: (B, 3, size, size) float 0-255, one computation whatever the batch size.

    `pixels` holds the images (height, width, 3) uint8, back to back; `spans` bounds the windows'
    heights and widths (the windows are padded to them, with zero weights). A batch holds about
    21 bytes per pixel of its largest window times its size, and the matrices' products cost
    that many multiply-adds times `size`: nothing for a GPU, which is what this is for."""
    if mode != "bilinear":
        raise ValueError(f"resample resizes bilinearly, not {mode!r}")
    start, width, top0, left0, window_h, window_w, resized_h, resized_w, top, left, flip, _ = plan.unbind(1)
    rows_y = torch.minimum(torch.arange(spans[0], device=plan.device), window_h[:, None] - 1) + top0[:, None]
    cols_x = torch.minimum(torch.arange(spans[1], device=plan.device), window_w[:, None] - 1) + left0[:, None]
    index = (start[:, None] + rows_y * width[:, None])[:, :, None] + cols_x[:, None, :]
    window = pixels.view(-1, 3)[index].permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    along_y = resize_weights(window_h, resized_h, top, size, spans[0])  # (B, size, span_h)
    along_x = resize_weights(window_w, resized_w, left, size, spans[1])  # (B, size, span_w)
    along_x = torch.where(flip.bool()[:, None, None], along_x.flip(1), along_x)
    # The weights are broadcast over the 3 channels, never over the rows: small copies only.
    return torch.matmul(torch.matmul(along_y[:, None], window), along_x.transpose(1, 2)[:, None])


def resize_weights(in_size: torch.Tensor, out_size: torch.Tensor, first: torch.Tensor, count: int,
                   span: int) -> torch.Tensor:
    """(B, count, span) float32: row i holds the weights of output index first + i when torch's
    antialiased bilinear resize (PIL's triangle filter, widened by the scale when it shrinks)
    takes in_size input positions to out_size, over input positions 0 .. span - 1."""
    scale = in_size.float() / out_size.float()
    support = scale.clamp(min=1.0)[:, None, None]
    centre = (first[:, None] + torch.arange(count, device=first.device) + 0.5) * scale[:, None]
    position = torch.arange(span, device=first.device) + 0.5
    weights = (1 - ((position - centre[:, :, None]) / support).abs()).clamp(min=0)
    weights = weights * (position < in_size[:, None, None])
    return weights / weights.sum(-1, keepdim=True)
