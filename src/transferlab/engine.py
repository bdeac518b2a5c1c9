"""The training loop shared by every mode: hardware decided once, then train/evaluate phases.

The loop never asks which mode it runs: a mode only decides which parameters require grad and
where the initial weights came from.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm import tqdm

from transferlab.errors import UserError
from transferlab.files import load_checkpoint, save_checkpoint


@dataclass(frozen=True)
class Hardware:
    """Everything device-dependent, decided once before the loop."""

    device: torch.device
    amp_dtype: torch.dtype | None   # autocast dtype, None for fp32
    channels_last: bool
    workers: int
    pin_memory: bool
    keep_freed_memory: bool  # glibc's malloc tuned by keep_freed_memory() in this process

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # Only fp16 underflows; bf16 has fp32's exponent range.
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def prepare(self, model: nn.Module) -> nn.Module:
        model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=self.pin_memory)
        if self.channels_last and images.dim() == 4:  # cached embeddings may be flat
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def describe(self) -> dict:
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        return {"device": self.device.type, "precision": precision, "channels_last": self.channels_last,
                "workers": self.workers, "pin_memory": self.pin_memory, "keep_freed_memory": self.keep_freed_memory}


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls/convs run natively instead of being emulated."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def pick_hardware(device: str = "auto", precision: str = "auto", channels_last: bool | str = "auto",
                  workers: int | str = "auto", keep_memory: bool | str = "auto") -> Hardware:
    """Resolve the `auto` settings for this machine and apply the one that is process-wide (the
    memory allocator's); an explicit setting the machine lacks is an error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but torch sees no CUDA GPU; set device: auto or cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("train.device is mps but this torch has no MPS backend; set device: auto or cpu")
    if precision == "auto":
        precision = _auto_precision(device)
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if channels_last == "auto":
        # Measured on CPU (benchmarks/hardware.py): faster in fp32 and bf16 alike; cuDNN likes it too.
        channels_last = device in ("cpu", "cuda")
    if workers == "auto":
        # Images are decoded once, so only cheap augmentation is left for workers. On a CPU they
        # would compete with the compute threads (measured: 0 workers 57.6 img/s, 2 workers 50.1).
        workers = 0 if device == "cpu" else min(4, os.cpu_count() or 1)
    if keep_memory == "auto":
        keep_memory = device == "cpu" and keep_freed_memory()
    elif keep_memory and not keep_freed_memory():
        raise UserError("train.keep_freed_memory is true, but this C library is not glibc, whose malloc "
                        "it tunes; set it to auto or false")
    return Hardware(torch.device(device), amp_dtype, bool(channels_last), int(workers),
                    pin_memory=device == "cuda", keep_freed_memory=bool(keep_memory))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt() parameters, from glibc's malloc.h


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    Every training step frees its activations and allocates them again; by default glibc returns
    such blocks to the OS, and touching them again costs a page fault per 4 KiB (measured on this
    CPU: squeezenet trains 20-25% faster without that, at the same peak memory). Blocks up to 32 MiB
    (glibc's ceiling) then come from the heap, and up to 1 GiB of free heap is kept. Returns
    whether it applied: False where the C library is not glibc (macOS, Windows, musl).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def _auto_precision(device: str) -> str:
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices); optionally demand deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def make_optimizer(params: list[nn.Parameter], name: str, lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; valid: sgd, adamw")


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, epochs: int, step_size: int,
                   gamma: float) -> torch.optim.lr_scheduler.LRScheduler | None:
    if name == "none":
        return None
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    raise ValueError(f"unknown scheduler {name!r}; valid: none, step, cosine")


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Predictions:
    """Class probabilities for a dataset, in its order."""

    probs: np.ndarray    # (n, classes), float64
    targets: np.ndarray  # (n,)
    stats: EpochStats


def split_outputs(outputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Main logits and auxiliary logits (inception, googlenet return a named tuple in training)."""
    if isinstance(outputs, torch.Tensor):
        return outputs, []
    main, *aux = outputs
    return main, [a for a in aux if a is not None]


def set_train_mode(model: nn.Module) -> None:
    """train(), except frozen BatchNorm layers keep their ImageNet statistics (feature extraction)."""
    model.train()
    for module in model.modules():
        if isinstance(module, _BatchNorm) and not any(p.requires_grad for p in module.parameters()):
            module.eval()


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, hw: Hardware,
                    scaler: torch.amp.GradScaler, aux_loss_weight: float = 0.4,
                    desc: str = "train") -> EpochStats:
    set_train_mode(model)
    criterion = nn.CrossEntropyLoss()
    total_loss, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    for images, targets in tqdm(loader, desc=desc, leave=False, disable=None):
        images, targets = hw.to_device(images), targets.to(hw.device, non_blocking=hw.pin_memory)
        with hw.autocast():
            logits, aux = split_outputs(model(images))
            loss = criterion(logits, targets) + sum(aux_loss_weight * criterion(a, targets) for a in aux)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total_loss += loss.item() * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(targets)
    return EpochStats(total_loss / seen, correct / seen, seen, time.perf_counter() - start)


@torch.no_grad()
def predict(model: nn.Module, loader, hw: Hardware, desc: str = "eval") -> Predictions:
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    probs, targets, total_loss, start = [], [], 0.0, time.perf_counter()
    for images, batch_targets in tqdm(loader, desc=desc, leave=False, disable=None):
        images, batch_targets = hw.to_device(images), batch_targets.to(hw.device)
        with hw.autocast():
            logits, _ = split_outputs(model(images))
        logits = logits.double()  # softmax in float64, so probabilities sum to 1 for log loss
        total_loss += criterion(logits, batch_targets).item()
        probs.append(logits.softmax(1).cpu())
        targets.append(batch_targets.cpu())
    probs_np, targets_np = torch.cat(probs).numpy(), torch.cat(targets).numpy()
    n = len(targets_np)
    accuracy = float((probs_np.argmax(1) == targets_np).mean())
    return Predictions(probs_np, targets_np, EpochStats(total_loss / n, accuracy, n, time.perf_counter() - start))


@dataclass
class FitResult:
    best_state: dict = field(default_factory=dict)
    best_epoch: int = 0                 # 1-based; 0 before the first epoch
    best_val: EpochStats | None = None
    history: list[dict] = field(default_factory=list)

    def consider(self, epoch: int, val: EpochStats, model: nn.Module) -> None:
        """Keep `model`'s weights if this epoch has the best val accuracy so far (then lowest loss)."""
        if self.best_val is None or (val.accuracy, -val.loss) > (self.best_val.accuracy, -self.best_val.loss):
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.best_epoch, self.best_val = epoch, val


def fit(model: nn.Module, train_loader, val_loader, optimizer: torch.optim.Optimizer, scheduler,
        epochs: int, hw: Hardware, aux_loss_weight: float = 0.4,
        on_epoch: Callable[[dict], None] = lambda record: None, resume_path: str | Path | None = None) -> FitResult:
    """Train for `epochs`, keeping the weights of the epoch with the best val accuracy (then loss).

    With `resume_path`, everything needed to continue (weights, optimizer, scheduler, RNGs) is
    saved there after each epoch, and a run that finds the file continues after its last epoch,
    ending where an uninterrupted run would have.
    """
    hw.prepare(model)
    scaler = hw.grad_scaler()
    stateful = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    generators = loader_generators(train_loader) + loader_generators(val_loader)
    result = FitResult()
    if resume_path is not None and Path(resume_path).exists():
        result = load_resume(resume_path, stateful, generators)
        print(f"resuming after epoch {result.history[-1]['epoch']} from {resume_path}", flush=True)
        for record in result.history:
            on_epoch(record)
    for epoch in range(len(result.history) + 1, epochs + 1):
        train = train_one_epoch(model, train_loader, optimizer, hw, scaler, aux_loss_weight,
                                desc=f"epoch {epoch}/{epochs} train")
        if scheduler is not None:
            scheduler.step()  # once per epoch, after the optimizer's steps
        val = predict(model, val_loader, hw, desc=f"epoch {epoch}/{epochs} val").stats
        record = {"epoch": epoch, "train_loss": train.loss, "train_acc": train.accuracy,
                  "val_loss": val.loss, "val_acc": val.accuracy, "train_seconds": train.seconds,
                  "train_images_per_s": train.images_per_second, "val_seconds": val.seconds,
                  "peak_rss_mb": peak_rss_mb()}
        result.history.append(record)
        print(f"epoch {epoch}/{epochs}: train loss {train.loss:.4f} acc {train.accuracy:.4f} | "
              f"val loss {val.loss:.4f} acc {val.accuracy:.4f} | {train.images_per_second:.1f} img/s",
              flush=True)
        result.consider(epoch, val, model)
        if resume_path is not None:
            save_resume(resume_path, result, stateful, generators)
        on_epoch(record)
    return result


def loader_generators(loader) -> list[torch.Generator]:
    """The generators a DataLoader draws its shuffling and worker seeds from."""
    found = [getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)]
    unique = {id(g): g for g in found if g is not None}
    return list(unique.values())


def save_resume(path: str | Path, result: FitResult, stateful: dict, generators: list[torch.Generator]) -> None:
    """The state after an epoch: tensors and plain values only, so it loads with weights_only=True."""
    np_state = np.random.get_state()
    save_checkpoint(path, {
        "states": {name: obj.state_dict() for name, obj in stateful.items() if obj is not None},
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                "generators": [g.get_state() for g in generators]},
        "best_state": result.best_state, "best_epoch": result.best_epoch,
        "best_val": asdict(result.best_val), "history": result.history})


def load_resume(path: str | Path, stateful: dict, generators: list[torch.Generator]) -> FitResult:
    saved = load_checkpoint(path)
    for name, obj in stateful.items():
        if obj is not None:
            obj.load_state_dict(saved["states"][name])
    rng = saved["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    for generator, state in zip(generators, rng["generators"]):
        generator.set_state(state)
    return FitResult(saved["best_state"], saved["best_epoch"], EpochStats(**saved["best_val"]), saved["history"])
