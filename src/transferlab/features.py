"""Feature extraction that runs the frozen backbone once, not once per epoch.

A frozen backbone's output never changes, so each training image is passed through it `views`
times (each a fresh random crop and flip, the tutorial's augmentation) and each val image once;
the head then trains on those cached embeddings. Every epoch takes every image once, in a random
order, each as one of its views drawn at random: an epoch has the tutorial's steps and images.
The cache is keyed by model, weights, preprocessing, views, seed, precision and the images' bytes.

Embeddings are written to disk a chunk at a time and read memory-mapped, like the decoded images:
memory stays flat in the number of images. Each file's CRC-32 is checked when it is opened; a
damaged or unfinished cache is rebuilt, with a warning. On an accelerator the backbone runs on
passes of `hw.inference_images` images, whatever the train batch, its embeddings come to the host
a chunk at a time (not batch by batch, with the device waiting), and the head trains on the cache
uploaded to the device where it fits.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import zlib
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from filelock import FileLock
from torch import nn
from torch.utils.data import BatchSampler, Sampler, SequentialSampler, TensorDataset

from transferlab.caches import mark_used
from transferlab.data import ShareOfBatches
from transferlab.distributed import SINGLE, World
from transferlab.errors import UserError, warn
from transferlab.files import atomic_path, no_space_message, remove, write_json
from transferlab.hardware import Hardware, residency_budget
from transferlab.images import Sample, samples_digest
from transferlab.models import BuiltModel

# 3: every view in the images' order (2: each view shuffled its own way; 1: views repeated the first's draws).
CACHE_FORMAT = 3
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Embeddings wait on an accelerator until they take this much, then come to the host in one copy
# (on a CPU they are there already: each pass's are written as they come).
CHUNK_BYTES = 64 << 20


class HeadOnly(nn.Module):
    """The trainable head and what the model computes after it, fed cached embeddings."""

    def __init__(self, head: nn.Module, tail: nn.Module):
        super().__init__()
        self.head, self.tail = head, tail

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.tail(self.head(embeddings.to(next(self.head.parameters()).dtype)))


def split_off_head(model: nn.Module, head_name: str) -> HeadOnly:
    """The head plus the layers after it in its nn.Sequential (squeezenet: ReLU, pool), flattened."""
    head = model.get_submodule(head_name)
    parent_name, _, child = head_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    after = []
    if isinstance(parent, nn.Sequential):
        names = list(parent._modules)
        after = [parent._modules[n] for n in names[names.index(child) + 1:]]
    return HeadOnly(head, nn.Sequential(*after, nn.Flatten(1)))


@torch.no_grad()
def embed(model: nn.Module, head: nn.Module, loader: Iterable, hw: Hardware, check: HeadOnly | None = None):
    """Inputs of `head` for the loader's images, in order, with their targets: chunks of them on
    the CPU, in the autocast dtype. With `check`, first verify that `check(embedding)` reproduces
    the model's output, else yield nothing."""
    captured, held, chunk_bytes = [], [], 0 if hw.device.type == "cpu" else CHUNK_BYTES
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach()))
    model.eval()
    try:
        for images, targets, real in passes(loader, hw.inference_images):
            with hw.autocast():
                outputs = model(hw.to_device(images))
                if check is not None:
                    if not torch.allclose(check(captured[-1]).float(), outputs.float(), atol=1e-3, rtol=1e-3):
                        return
                    check = None
            held.append((captured.pop()[:real], targets[:real]))
            if sum(embeddings.nbytes for embeddings, _ in held) >= chunk_bytes:
                yield _to_host(held, hw)
                held = []
        if held:
            yield _to_host(held, hw)
    finally:
        hook.remove()


def _to_host(held: list[tuple[torch.Tensor, torch.Tensor]], hw: Hardware) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and targets held on the device, on the host: one copy each."""
    embeddings, targets = zip(*held)
    return torch.cat(embeddings).to("cpu", hw.amp_dtype or torch.float32), torch.cat(targets).cpu()


def passes(loader: Iterable, size: int):
    """(images, targets, real images) for the backbone: the loader's batches as they come when
    `size` is 0, else put together into passes of exactly `size` images, the last padded with
    copies of its first image (one batch shape: one cuDNN autotuning, no tail to warm up).
    Empty batches (a process's share of a last, small batch) are skipped."""
    held, count = [], 0
    for images, targets in loader:
        if not len(targets):
            continue
        if not size:
            yield images, targets, len(targets)
            continue
        held, count = held + [(images, targets)], count + len(targets)
        while count >= size:
            images, targets = (torch.cat(part) for part in zip(*held))
            yield images[:size], targets[:size], size
            held, count = [(images[size:], targets[size:])], count - size
    if count:
        images, targets = (torch.cat(part) for part in zip(*held))
        pad = images[:1].expand(size - count, *images.shape[1:])
        yield torch.cat([images, pad]), targets, count


def feature_loaders(built: BuiltModel, train: list[Sample], val: list[Sample], batch_size: int, views: int,
                    hw: Hardware, seed: int, cache_dir: str | Path,
                    image_loader: Callable[[list[Sample], bool], Iterable], world: World = SINGLE,
                    train_rows: list[int] | None = None, order_seed: int | None = None, augment: str = "none"):
    """(HeadOnly model, train loader, val loader) over cached embeddings, or None when this model's
    head output is not its output (the caller then trains with the backbone in the loop).

    `train_rows` (indices into `train`, repeats allowed) trains on those images only, from the
    cache of all of `train`: a learning curve's points share one embedding pass. `order_seed`
    (default `seed`) draws the epochs' order and views; `seed` drew the cached crops. `augment`
    names the augmentation (recipes.augmenter) that `image_loader` applies to training views: part
    of the cache's key.

    `image_loader(samples, augment)` gives batches of the images in the samples' order, never
    shuffled: augmented (one pass = one view) or not; with several processes, this one's share of
    each batch. Each process then embeds its shares, rank 0 puts them together in the order one
    process writes them, and every process reads the cache: it must lie in a folder all of them see
    (TRANSFERLAB_CACHE_DIR, across machines).
    """
    main_head = built.head_names[-1]  # inception lists its auxiliary head first; eval uses the main one
    head_only = split_off_head(built.model, main_head)
    hw.prepare(built.model)
    key = _cache_key(built, train, val, views, seed, hw, batch_size, augment)
    folder = Path(cache_dir) / f"features-{built.arch}-{key}"
    cached = _open(folder) if world.main else None
    if world.broadcast(cached is None):
        # Another experiment may be building the same cache: the first builds, the others wait.
        with FileLock(str(folder) + ".lock") if world.main else contextlib.nullcontext():
            cached = _open(folder, quiet=True) if world.main else None
            if world.broadcast(cached is None) and not _build(folder, built, head_only, train, val, views, hw,
                                                               batch_size, image_loader, world):
                return None
    if not world.main:
        cached = _open(folder, quiet=True)
        if cached is None:
            raise UserError(f"process {world.rank} cannot read the embedding cache {folder} that process 0 "
                            f"wrote: across machines, set TRANSFERLAB_CACHE_DIR to a folder they share, or "
                            f"extract.cache_features to false")
    train_x, train_y, val_x, val_y = cached if cached is not None else _open(folder)
    train_x, train_y, val_x, val_y = _on_device([train_x.flatten(0, 1), train_y, val_x, val_y], hw.device)
    # The loader's own generator, which fit() saves and restores with each epoch: resume is exact.
    generator = torch.Generator().manual_seed(seed if order_seed is None else order_seed)
    rows = torch.arange(len(train)) if train_rows is None else torch.tensor(train_rows, dtype=torch.long)
    train_batches = ShareOfBatches(BatchSampler(OneViewPerImage(rows, len(train), views, generator), batch_size,
                                                False), world)
    train_loader = EmbeddingBatches(TensorDataset(train_x, train_y), train_batches, generator, hw.pin_memory)
    val_batches = ShareOfBatches(BatchSampler(SequentialSampler(val_x), batch_size, False), world)
    val_loader = EmbeddingBatches(TensorDataset(val_x, val_y), val_batches, None, hw.pin_memory)
    return head_only, train_loader, val_loader


def _on_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The cache's tensors uploaded to `device` when they fit its residency budget, and the
    device then has the room; else as they are (memory-mapped)."""
    nbytes = sum(t.nbytes for t in tensors)
    if not nbytes or nbytes > residency_budget(device):
        return tensors
    try:
        return [t.to(device) for t in tensors]
    except torch.OutOfMemoryError:
        warn(f"{nbytes / 2**20:.0f} MB of cached embeddings do not fit on {device} now (out of memory): the head "
             f"trains on them from the memory-mapped cache instead")
        return tensors


class EmbeddingBatches:
    """Batches of cached embeddings and their targets, each taken with one index (not fetched row
    by row and collated, as a DataLoader does), in the order and with the draws a DataLoader over
    the same batch sampler and generator gives. On the device when the cache is there (the
    epoch's indices sent once, without waiting); from the host, pinned where transfers are."""

    def __init__(self, dataset: TensorDataset, batch_sampler: Sampler, generator: torch.Generator | None,
                 pin_memory: bool = False):
        self.dataset, self.batch_sampler, self.generator = dataset, batch_sampler, generator
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        # A DataLoader draws its workers' base seed first, each epoch, from its generator (torch's
        # own without one): drawn here too, so that every later draw is the one it gave.
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        embeddings, targets = self.dataset.tensors
        batches = list(self.batch_sampler)
        index = torch.tensor([row for batch in batches for row in batch], dtype=torch.long)
        on_host = embeddings.device.type == "cpu"
        pinned = self.pin_memory and not on_host
        index = (index.pin_memory() if pinned else index).to(embeddings.device, non_blocking=pinned)
        start = 0
        for batch in batches:
            rows = index[start:start + len(batch)]
            start += len(batch)
            x, y = embeddings[rows], targets[rows]
            yield (x.pin_memory(), y.pin_memory()) if self.pin_memory and on_host else (x, y)


class OneViewPerImage(Sampler):
    """Rows of the (views, images) embedding cache, flattened: each epoch every image of `rows`
    once (an image listed twice, twice), in a random order, each as one of its views, drawn at random."""

    def __init__(self, rows: torch.Tensor, images: int, views: int, generator: torch.Generator):
        self.rows, self.images, self.views, self.generator = rows, images, views, generator

    def __iter__(self):
        order = self.rows[torch.randperm(len(self.rows), generator=self.generator)]
        view = torch.randint(self.views, (len(self.rows),), generator=self.generator)
        return iter((view * self.images + order).tolist())

    def __len__(self) -> int:
        return len(self.rows)


def _build(folder: Path, built: BuiltModel, head_only: HeadOnly, train, val, views, hw, batch_size, image_loader,
           world: World) -> bool:
    """Embed every image (each process its shares), then write meta.json; False, and no cache,
    when the model's output is not its head's output."""
    if world.main:
        remove(folder)
        folder.mkdir(parents=True)
    world.barrier()
    head = head_only.head
    try:
        with no_space_message(folder / "train.bin"):
            val_batches = embed(built.model, head, image_loader(val, False), hw, check=head_only)
            val_meta = _write_shares(folder, "val", val_batches, _batch_sizes(len(val), batch_size), world)
            if world.broadcast(val_meta is not None):
                train_images = image_loader(train, True)  # one loader, iterated once per view: fresh draws
                passes = (batch for _ in range(views) for batch in embed(built.model, head, train_images, hw))
                train_meta = _write_shares(folder, "train", passes, _batch_sizes(len(train), batch_size) * views,
                                           world)
                if world.main:  # every view in the images' order; the targets are kept for each
                    train_meta["shape"] = [views, len(train), *train_meta["shape"][1:]]
                    write_json(folder / "meta.json", {"train": train_meta, "val": val_meta})  # last: complete
                world.barrier()
                return True
    except BaseException:
        remove(folder)  # an unfinished cache is worth nothing: leave no half of one behind
        raise
    if world.main:
        remove(folder)
    return False


def _batch_sizes(n: int, batch_size: int) -> list[int]:
    return [min(batch_size, n - start) for start in range(0, n, batch_size)]


def _write_shares(folder: Path, split: str, batches: Iterable, batch_sizes: list[int], world: World) -> dict | None:
    """Write `split`.bin from every process's shares of the batches; its meta on rank 0 (None if
    a process embedded nothing). One process writes the file directly."""
    if world.size == 1:
        return _write(folder / f"{split}.bin", batches)
    own = folder / f"{split}.part{world.rank}.bin"
    metas = world.gather(_write(own, batches))
    world.barrier()
    if not world.main:
        return {}
    if None in metas:
        return None
    merged = _merge(folder / f"{split}.bin", [folder / f"{split}.part{r}.bin" for r in range(world.size)], metas,
                    batch_sizes)
    for rank in range(world.size):
        remove(folder / f"{split}.part{rank}.bin")
    return merged


def _merge(path: Path, parts: list[Path], metas: list[dict], batch_sizes: list[int]) -> dict:
    """One file in the order one process writes: batch by batch, each process's share in turn."""
    row_shape = max(metas, key=lambda meta: meta["shape"][0])["shape"][1:]
    dtype = {name: dt for dt, name in DTYPE_NAMES.items()}[metas[0]["dtype"]]
    row_bytes = int(np.prod(row_shape)) * torch.empty(0, dtype=dtype).element_size()
    size, taken, targets, crc = len(parts), [0] * len(parts), [], 0
    with atomic_path(path) as tmp, open(tmp, "wb") as out, contextlib.ExitStack() as stack:
        readers = [stack.enter_context(open(part, "rb")) for part in parts]
        for n in batch_sizes:
            for rank, reader in enumerate(readers):
                share = World(rank, size).shard(n)
                rows = share.stop - share.start
                raw = reader.read(rows * row_bytes)
                out.write(raw)
                crc = zlib.crc32(raw, crc)
                targets += metas[rank]["targets"][taken[rank]:taken[rank] + rows]
                taken[rank] += rows
    return {"shape": [sum(batch_sizes), *row_shape], "dtype": metas[0]["dtype"], "targets": targets, "crc32": crc}


def _write(path: Path, batches: Iterable) -> dict | None:
    """Stream (embeddings, targets) batches into `path`; their shape, dtype, targets and CRC-32."""
    rows, targets, crc, dtype, shape = 0, [], 0, None, None
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        for embeddings, batch_targets in batches:
            data = embeddings.contiguous()  # (batch, features) or, before a conv head, (batch, C, H, W)
            raw = data.view(torch.uint8).numpy().tobytes() if data.dtype == torch.bfloat16 else data.numpy().tobytes()
            out.write(raw)
            crc = zlib.crc32(raw, crc)
            rows, dtype, shape = rows + len(data), data.dtype, list(data.shape[1:])
            targets += batch_targets.tolist()
        if dtype is None:
            return None
    return {"shape": [rows, *shape], "dtype": DTYPE_NAMES[dtype], "targets": targets, "crc32": crc}


def _open(folder: Path, quiet: bool = False):
    """(train embeddings (views, N, D), train targets, val embeddings, val targets), memory-mapped;
    None if the cache is absent, unfinished or damaged (then it is rebuilt, with a warning)."""
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        arrays = [_map(folder / f"{split}.bin", meta[split]) for split in ("train", "val")]
    except (OSError, ValueError, KeyError, TypeError) as err:
        if not quiet:
            warn(f"{folder}: damaged embedding cache ({err}); running the backbone again to rebuild it")
        remove(meta_path)
        return None
    (train_x, train_y), (val_x, val_y) = arrays
    mark_used(folder)
    return train_x, train_y, val_x, val_y


def _map(path: Path, meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = {name: dt for dt, name in DTYPE_NAMES.items()}[meta["dtype"]]
    expected = int(np.prod(meta["shape"])) * torch.empty(0, dtype=dtype).element_size()
    if path.stat().st_size != expected:
        raise ValueError(f"{path.name} holds {path.stat().st_size} bytes, not {expected}")
    raw = np.memmap(path, dtype=np.uint8, mode="c")
    if zlib.crc32(raw) != meta["crc32"]:
        raise ValueError(f"{path.name} does not match its checksum")
    data = torch.from_numpy(raw).view(dtype).view(meta["shape"])
    return data, torch.tensor(meta["targets"])


def _cache_key(built: BuiltModel, train: list[Sample], val: list[Sample], views: int, seed: int,
               hw: Hardware, batch_size: int, augment: str = "none") -> str:
    identity = [CACHE_FORMAT, batch_size, built.arch, built.weights_id, built.arch_kwargs, built.preprocess.__dict__,
                views, seed, str(hw.amp_dtype), hw.tensor_batches, samples_digest(train), samples_digest(val)]
    # Named only when on: the caches built before augmentation existed keep their keys.
    identity = json.dumps(identity + ([augment] if augment != "none" else []), sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:20]
