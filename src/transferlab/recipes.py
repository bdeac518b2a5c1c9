"""The small parts the training loop calls, one place each, each implemented by the library that
already has it (torchvision's references/classification recipes):

- a stopping rule: `patience` validation checks without improvement end a run (Lightning's and
  fastai's EarlyStopping);
- the loss: cross-entropy with label smoothing (`nn.CrossEntropyLoss(label_smoothing=)`), which
  also takes the soft targets that mixing makes;
- a batch transform: mixup or cutmix (`torchvision.transforms.v2.MixUp` / `CutMix`), one or the
  other per batch when both are set;
- a weight averager: an exponential moving average of the weights
  (`torch.optim.swa_utils.AveragedModel`), which validation then scores;
- stronger augmentation: `TrivialAugmentWide` or `RandAugment` (`torchvision.transforms.v2`), per
  image, on uint8 images, before the crop's normalisation.

Each is a params key of `train` (label_smoothing, mixup_alpha, cutmix_alpha, ema_decay, augment),
off by default: engine.fit takes the loss, the mixer and the decay; data.py the augmentation.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

AUGMENTATIONS = ("none", "trivialaugment", "randaugment")


@dataclass
class EarlyStopping:
    """Stop after `patience` validation checks without a better val accuracy (ties broken by a
    lower loss, as the best epoch is picked), but not before `min_epochs` checks (Lightning's
    min_epochs): a network trained from random weights can sit at chance for its first epochs
    while its training loss falls, and patience alone would end it there. patience 0: never stop
    early."""
    patience: int
    min_epochs: int = 0
    best: tuple[float, float] | None = None
    waited: int = 0
    checks: int = 0

    def should_stop(self, accuracy: float, loss: float) -> bool:
        score = (accuracy, -loss)
        self.checks += 1
        if self.best is None or score > self.best:
            self.best, self.waited = score, 0
        else:
            self.waited += 1
        return self.patience > 0 and self.waited >= self.patience and self.checks >= self.min_epochs

    def state_dict(self) -> dict:
        return {"best": list(self.best) if self.best else None, "waited": self.waited, "checks": self.checks}

    def load_state_dict(self, state: dict) -> None:
        self.best = tuple(state["best"]) if state["best"] else None
        self.waited, self.checks = state["waited"], state.get("checks", 0)


def criterion(label_smoothing: float = 0.0) -> nn.CrossEntropyLoss:
    """Summed cross-entropy (the loop scales it to the whole batch's mean), smoothed as asked;
    it takes class indices or, after mixing, class probabilities."""
    return nn.CrossEntropyLoss(reduction="sum", label_smoothing=label_smoothing)


class BatchMixer:
    """Mixup and/or cutmix of a training batch: (images, class indices) -> (images, class
    probabilities). With both, each batch takes one of them at random (torchvision's RandomChoice
    recipe). They draw from torch's global generator, which resume restores."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0):
        from torchvision.transforms import v2

        if num_classes < 2:
            raise ValueError(f"mixup and cutmix mix the labels of two classes or more; this data has {num_classes}")
        self.mixes = ([v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha > 0 else []) + \
                     ([v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha > 0 else [])

    def __bool__(self) -> bool:
        return bool(self.mixes)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(targets) < 2:  # nothing to mix with
            return images, targets
        mix = self.mixes[int(torch.randint(len(self.mixes), ()))] if len(self.mixes) > 1 else self.mixes[0]
        return mix(images, targets)


def averaged(model: nn.Module, decay: float) -> nn.Module:
    """An exponential moving average of `model`'s weights (and its BatchNorm statistics), updated
    by `.update_parameters(model)` after each optimizer step. The first update copies the weights;
    each later one moves the average by 1 - min(decay, (1 + n) / (10 + n)) towards them, n being
    the updates before it (TensorFlow's ExponentialMovingAverage rule with num_updates = n): a
    small dataset trains for a few hundred steps, and 0.999 from the start would keep the average
    near the untrained weights for all of them. The rate is computed on the device, so a GPU
    step does not wait for the host."""
    from torch.optim.swa_utils import AveragedModel

    @torch.no_grad()
    def update(average: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor) -> None:
        rate = 1 - torch.clamp((1 + updates.double()) / (10 + updates.double()), max=decay)
        if torch.is_floating_point(average[0]):
            torch._foreach_lerp_(average, current, [rate.to(average[0].dtype)] * len(average))
        else:  # integer buffers (BatchNorm's batch count)
            for mean, now in zip(average, current):
                mean.copy_(mean * (1 - rate) + now * rate)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def augmenter(name: str, seed: int) -> Augmenter | None:
    """A function (3, h, w) uint8 -> (3, h, w) uint8 applying `name`'s random policy to one image,
    drawing from its own seeded generator (or from a seed given with each image); None for "none"."""
    if name == "none":
        return None
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; valid: {', '.join(AUGMENTATIONS)}")
    from torchvision.transforms import v2  # here: the tensor-batch path without it needs no torchvision
    return Augmenter(v2.TrivialAugmentWide() if name == "trivialaugment" else v2.RandAugment(), random.Random(seed))


@dataclass
class Augmenter:
    """`policy` on one image at a time (a class, not a closure: DataLoader workers may pickle it)."""
    policy: nn.Module
    draws: random.Random

    def __call__(self, image: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """`seed`: this image's own, drawn by a loader from a generator that resume restores;
        without one, the next of the augmenter's own sequence."""
        # v2's policies draw from torch's global generator: fork it, seeded from ours, so that the
        # images' augmentation is reproducible and leaves every other draw as it was.
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone: torch.manual_seed would reseed an accelerator's too, which
            # fork_rng(devices=[]) does not put back.
            torch.default_generator.manual_seed(self.draws.getrandbits(63) if seed is None else seed)
            return self.policy(image)
