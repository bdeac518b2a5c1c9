"""Feature extraction that runs the frozen backbone once, not once per epoch.

A frozen backbone's output never changes, so each training image is passed through it `views`
times (each a fresh random crop and flip, the tutorial's augmentation) and each val image once;
the head then trains on those cached embeddings. Every epoch draws one view per image, so an
epoch has as many steps as the tutorial's. The cache is keyed by model, weights, preprocessing,
views, seed, precision and the images' bytes.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from transferlab.data import ImageDataset, build_transform, make_loader, samples_digest
from transferlab.engine import Hardware
from transferlab.files import load_checkpoint, save_checkpoint
from transferlab.images import Sample
from transferlab.models import BuiltModel


class HeadOnly(nn.Module):
    """The trainable head and what the model computes after it, fed cached embeddings."""

    def __init__(self, head: nn.Module, tail: nn.Module):
        super().__init__()
        self.head, self.tail = head, tail

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.tail(self.head(embeddings.to(self.head.weight.dtype)))


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
def embed(model: nn.Module, head: nn.Module, loader, hw: Hardware, check: HeadOnly | None = None):
    """Inputs of `head` for every image (the embeddings), and targets; with `check`, verify on the
    first batch that `check(embedding)` reproduces the model's output, else return None."""
    captured = []
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach()))
    model.eval()
    embeddings, targets = [], []
    try:
        for images, batch_targets in loader:
            with hw.autocast():
                outputs = model(hw.to_device(images))
                if check is not None and not embeddings:
                    if not torch.allclose(check(captured[-1]).float(), outputs.float(), atol=1e-3, rtol=1e-3):
                        return None
            embeddings.append(captured.pop().to("cpu", hw.amp_dtype or torch.float32))
            targets.append(batch_targets)
    finally:
        hook.remove()
    return torch.cat(embeddings), torch.cat(targets)


def feature_loaders(built: BuiltModel, train: list[Sample], val: list[Sample], classes: list[str],
                    batch_size: int, views: int, hw: Hardware, seed: int, cache_dir: str | Path):
    """(HeadOnly model, train loader, val loader) over cached embeddings, or None when this model's
    head output is not its output (the caller then trains with the backbone in the loop)."""
    main_head = built.head_names[-1]  # inception lists its auxiliary head first; eval uses the main one
    head_only = split_off_head(built.model, main_head)
    hw.prepare(built.model)
    key = _cache_key(built, train, val, views, seed, hw)
    path = Path(cache_dir) / f"features-{built.arch}-{key}.pt"
    if path.exists():
        cached = load_checkpoint(path)
    else:
        cached = _embed_all(built, head_only, train, val, classes, batch_size, views, hw, seed, cache_dir)
        if cached is None:
            return None
        save_checkpoint(path, cached)
    train_set = TensorDataset(cached["train"].flatten(0, 1), cached["train_targets"].repeat(views))
    sampler = RandomSampler(train_set, num_samples=len(train), generator=torch.Generator().manual_seed(seed))
    train_loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler)
    val_loader = DataLoader(TensorDataset(cached["val"], cached["val_targets"]), batch_size=batch_size)
    return head_only, train_loader, val_loader


def _embed_all(built: BuiltModel, head_only: HeadOnly, train, val, classes, batch_size, views, hw, seed,
               cache_dir) -> dict | None:
    # The training batch size, not a larger one: on a CPU, batches of 64 ran squeezenet's forward
    # at half the images/s of batches of 8 (activations outgrow the caches).
    pre, head = built.preprocess, head_only.head
    val_set = ImageDataset(val, classes, build_transform(pre, False), pre.resize_size, cache_dir=cache_dir)
    val_loader = make_loader(val_set, batch_size, False, seed, hw.workers)
    val_embedded = embed(built.model, head, val_loader, hw, check=head_only)
    if val_embedded is None:
        return None
    train_set = ImageDataset(train, classes, build_transform(pre, True), pre.resize_size, cache_dir=cache_dir)
    loader = make_loader(train_set, batch_size, False, seed, hw.workers)  # one pass: a random view of each
    passes = [embed(built.model, head, loader, hw) for _ in range(views)]
    return {"train": torch.stack([p[0] for p in passes]), "train_targets": passes[0][1],
            "val": val_embedded[0], "val_targets": val_embedded[1]}


def _cache_key(built: BuiltModel, train: list[Sample], val: list[Sample], views: int, seed: int,
               hw: Hardware) -> str:
    identity = json.dumps([built.arch, built.weights_id, built.arch_kwargs, built.preprocess.__dict__, views,
                           seed, str(hw.amp_dtype), samples_digest(train), samples_digest(val)], sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:20]
