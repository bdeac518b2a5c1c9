"""The training loop shared by every mode: hardware decided once, then train/evaluate phases.

The loop never asks which mode it runs: a mode only decides which parameters require grad and
where the initial weights came from.
"""
from __future__ import annotations

import os
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm import tqdm

from transferlab.distributed import SINGLE, World, whole_batch_sizes
from transferlab.errors import UserError, warn
from transferlab.files import load_checkpoint, save_checkpoint
from transferlab.hardware import Hardware
from transferlab.recipes import BatchMixer, EarlyStopping, averaged, criterion


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_device_memory_mb(device: torch.device) -> float | None:
    """The most memory torch's allocator held at once on `device` so far (None off CUDA: on a
    CPU, peak_rss_mb says it)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices); optionally ask for deterministic kernels.

    Deterministic: every op that has a deterministic kernel uses it, and cuDNN autotuning is off.
    An op without one (on CUDA, the backward of adaptive average pooling to vgg's 7x7, alexnet's
    6x6 and googlenet's 4x4) warns once and runs as it is (warn_only): such a model trains, only
    not bit for bit alike run after run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def make_optimizer(params: list[nn.Parameter] | list[dict], name: str, lr: float, momentum: float,
                   weight_decay: float, fused: bool = False) -> torch.optim.Optimizer:
    """`params` may be groups with their own "lr" (discriminative learning rates). `fused`: one
    kernel for the whole step (`fused_optimizer` says where)."""
    extra = {"fused": True} if fused else {}
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **extra)
    if name == "adam":  # momentum is Adam's beta1, the same role
        return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay, **extra)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay, **extra)
    raise ValueError(f"unknown optimizer {name!r}; valid: sgd, adam, adamw")


def fused_optimizer(device: torch.device) -> bool:
    """Whether the optimizer steps with a fused kernel on `device`: on CUDA, where fp16's
    GradScaler then hands the kernel its scale and its inf check on the device (an unfused step
    reads the check on the host, a synchronisation per step). Elsewhere the step as it was."""
    return device.type == "cuda"


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, epochs: int, step_size: int, gamma: float,
                   warmup_epochs: int = 0, steps_per_epoch: int = 1) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The lr schedule: stepped once per epoch, except onecycle, stepped after every batch (`fit`
    knows). A warm-up raises the lr linearly from a tenth over `warmup_epochs` epochs first."""
    lr_scheduler = torch.optim.lr_scheduler
    if name == "onecycle":
        return lr_scheduler.OneCycleLR(optimizer, max_lr=[group["lr"] for group in optimizer.param_groups],
                                       total_steps=epochs * steps_per_epoch)
    main_epochs = max(1, epochs - warmup_epochs)
    schedules = {"none": None, "step": lambda: lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma),
                 "cosine": lambda: lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_epochs)}
    if name not in schedules:
        raise ValueError(f"unknown scheduler {name!r}; valid: none, step, cosine, onecycle")
    main = schedules[name]() if schedules[name] else None
    if not warmup_epochs:
        return main
    warm = lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=warmup_epochs)
    return warm if main is None else lr_scheduler.SequentialLR(optimizer, [warm, main], milestones=[warmup_epochs])


def steps_per_batch(scheduler) -> bool:
    return isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)


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


IGNORED = -100  # nn.CrossEntropyLoss's ignore_index: such a target adds nothing to loss or gradient


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, hw: Hardware,
                    scaler: torch.amp.GradScaler, aux_loss_weight: float = 0.4,
                    desc: str = "train", batch_scheduler=None, world: World = SINGLE, loss: nn.Module | None = None,
                    mixer: BatchMixer | None = None, after_step: Callable[[], None] | None = None) -> EpochStats:
    """One epoch; with several processes, each passes its share of every batch through `model`
    (DistributedDataParallel, which averages the gradients) and the stats cover all shares.

    `loss`: summed, as recipes.criterion makes it (plain cross-entropy by default); `mixer`
    mixes each batch first (mixup, cutmix); `after_step` runs after every optimizer step (the
    weights' moving average)."""
    set_train_mode(model)
    loss_fn = criterion() if loss is None else loss
    whole = whole_batch_sizes(loader)  # every process knows each batch's size: no collective per step
    # Loss and hits stay on the device and are read once, at the end: a read per step would make
    # the host wait for the GPU every step. The losses add up on the host, in float64 (which an
    # Apple GPU lacks), in the order of the steps.
    losses, correct = [], torch.zeros((), device=hw.device, dtype=torch.int64)
    seen, start, stand_in = 0, time.perf_counter(), None
    for step, (images, targets) in enumerate(tqdm(loader, desc=desc, leave=False,
                                                  disable=None if world.main else True)):
        images, targets = hw.to_device(images), targets.to(hw.device, non_blocking=hw.pin_memory)
        images_here = len(targets)
        assert images_here == world.share_size(whole[step]), "a share that is not World.shard's of its batch"
        if images_here:
            stand_in = images[:1]
        else:  # an empty share of a last batch: every process must step, so one image that counts nothing
            images, targets = stand_in, torch.full((1,), IGNORED, device=hw.device)
        # Mixed, the targets are class probabilities; accuracy still counts against the hard ones,
        # the label each image started from (a noisy count: a mixed image may hold less of it than
        # of its partner). The stand-in is never mixed: its IGNORED target must stay an index, so
        # that it counts nothing.
        hard = targets
        if mixer and images_here:
            images, targets = mixer(images, targets)
        scale = world.mean_scale(whole[step])  # the whole batch's mean, however it is shared
        with hw.autocast():
            logits, aux = split_outputs(model(images))
            loss_sum = summed_loss(loss_fn, logits, targets) + sum(
                aux_loss_weight * summed_loss(loss_fn, a, targets) for a in aux)
            loss = loss_sum * scale
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if batch_scheduler is not None:
            batch_scheduler.step()
        if after_step is not None:
            after_step()
        losses.append(loss_sum.detach())
        correct += (logits.argmax(1) == hard).sum()
        seen += images_here
    return all_processes(world, host_sum(losses), correct.item(), seen, time.perf_counter() - start)


def summed_loss(loss_fn: nn.Module, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`loss_fn` on class indices, or on mixing's float32 class probabilities, which meet the
    logits in float32 (autocast's fp16 or bf16 logits would round them)."""
    return loss_fn(logits.float(), targets) if targets.is_floating_point() else loss_fn(logits, targets)


def host_sum(values: list[torch.Tensor]) -> float:
    """The sum of 0-d tensors, read from the device at once and added in float64 on the host, one
    after the other (the order and rounding of adding each into a float64 total)."""
    total = 0.0
    for value in torch.stack(values).cpu().double().tolist() if values else []:
        total += value
    return total


def all_processes(world: World, loss_sum: float, correct: float, images: int, seconds: float) -> EpochStats:
    """Stats of a phase over every process's share (this process's alone in a world of one)."""
    loss_sum, correct, images = world.sum([loss_sum, correct, images])
    return EpochStats(loss_sum / max(images, 1), correct / max(images, 1), int(images), seconds)


@torch.no_grad()
def predict(model: nn.Module, loader, hw: Hardware, desc: str = "eval", show: bool = True) -> Predictions:
    """Class probabilities of every image `loader` gives (this process's shares). The logits stay
    on the device until the end; softmax and the loss are then taken on the host in float64 (so
    probabilities sum to 1 for log loss; an Apple GPU has no float64), batch by batch."""
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    logits, targets, start = [], [], time.perf_counter()
    for images, batch_targets in tqdm(loader, desc=desc, leave=False, disable=None if show else True):
        if not len(batch_targets):  # this process's empty share of a last, small batch
            continue
        with hw.autocast():
            batch_logits, _ = split_outputs(model(hw.to_device(images)))
        logits.append(batch_logits)
        targets.append(batch_targets)
    sizes = [len(t) for t in targets]
    on_host = torch.cat(logits).cpu().double().split(sizes) if logits else []  # one read of the device
    targets = torch.cat(targets).cpu().split(sizes) if targets else []
    seconds = time.perf_counter() - start  # the work is done once its results are on the host
    total_loss = torch.zeros((), dtype=torch.float64)
    for batch_logits, batch_targets in zip(on_host, targets):
        total_loss += criterion(batch_logits, batch_targets)
    probs = [batch_logits.softmax(1) for batch_logits in on_host] or [torch.zeros(0, 0, dtype=torch.float64)]
    probs_np = torch.cat(probs).numpy()
    targets_np = torch.cat(targets).numpy() if targets else np.zeros(0, dtype=np.int64)
    n = len(targets_np)  # 0 for a process whose shares of the batches were all empty
    accuracy = float((probs_np.argmax(1) == targets_np).mean()) if n else 0.0
    return Predictions(probs_np, targets_np, EpochStats(total_loss.item() / max(n, 1), accuracy, n, seconds))


@dataclass
class FitResult:
    best_state: dict = field(default_factory=dict)
    best_epoch: int = 0                 # 1-based; 0 before the first epoch
    best_val: EpochStats | None = None
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False         # the stopping rule ended it before its cap of epochs

    def after(self, earlier: list[dict]) -> None:
        """Put epochs of an earlier phase (the head alone) before these, numbering on from them."""
        for record in self.history:
            record["epoch"] += len(earlier)
        self.history[:0] = earlier
        self.best_epoch += len(earlier)

    def consider(self, epoch: int, val: EpochStats, model: nn.Module) -> None:
        """Keep `model`'s weights if this epoch has the best val accuracy so far (then lowest loss)."""
        if self.best_val is None or (val.accuracy, -val.loss) > (self.best_val.accuracy, -self.best_val.loss):
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.best_epoch, self.best_val = epoch, val


def fit(model: nn.Module, train_loader, val_loader, optimizer: torch.optim.Optimizer, scheduler,
        epochs: int, hw: Hardware, aux_loss_weight: float = 0.4,
        on_epoch: Callable[[dict], None] = lambda record: None, resume_path: str | Path | None = None,
        world: World = SINGLE, saved: dict | None = None, patience: int = 0, loss: nn.Module | None = None,
        mixer: BatchMixer | None = None, ema_decay: float = 0.0, min_epochs: int = 0) -> FitResult:
    """Train for `epochs`, keeping the weights of the epoch with the best val accuracy (then loss);
    with `patience`, stop once that many validation checks in a row found none better, but not
    before `min_epochs` (recipes.EarlyStopping): `epochs` is then the cap. A schedule planned over `epochs` (step,
    cosine, onecycle) is cut where the run stops: its lr never reaches the schedule's end, and the
    best epoch is what counts.

    With `resume_path`, everything needed to continue (weights, optimizer, scheduler, GradScaler,
    every generator: the CPU's, the device's, the loaders'; and the hardware settings trained at)
    is saved there after each epoch, and a run that finds the file continues after its last
    epoch (`saved`: the state `load_resume` read from it, when the caller read it first, to train
    at its hardware settings: `hw` must hold them). On a CPU a resumed run ends exactly where an
    uninterrupted one does; on a GPU it replays the same random draws, and ends bit for bit alike
    with `deterministic: true` (cuDNN's autotuning and non-deterministic kernels off), otherwise
    within their rounding. With several processes, every one takes the same steps on its share
    of each batch and sees the same val stats (so they agree on the best epoch); rank 0 alone
    prints and saves the resume state, which it reads for all of them.

    `loss` and `mixer` are train_one_epoch's (validation's loss stays plain cross-entropy, so val
    losses compare across recipes). With `ema_decay`, a moving average of the weights follows
    every step (recipes.averaged): validation scores it, and the best epoch keeps its weights.
    """
    hw.prepare(model)
    scaler = hw.grad_scaler()
    ema = averaged(model, ema_decay) if ema_decay else None
    scored = model if ema is None else ema.module  # what val scores and the best epoch keeps
    stateful = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "ema": ema}
    generators = loader_generators(train_loader) + loader_generators(val_loader)
    result, stopping = FitResult(), EarlyStopping(patience, min_epochs)
    if saved is None:
        saved = load_resume(resume_path, world)
    if saved is not None:
        result = apply_resume(saved, stateful, generators, world.rank, hw.device)
        if world.main:
            print(f"resuming after epoch {result.history[-1]['epoch']} from {resume_path}", flush=True)
        for record in result.history:
            on_epoch(record)
            # The stopping rule's state follows from the epochs' val alone: replayed, not saved.
            result.stopped_early = stopping.should_stop(record["val_acc"], record["val_loss"])
    world.check_batchnorm(model, hw.device, max(whole_batch_sizes(train_loader), default=0))
    trained = world.wrap(model, hw.device)  # after the resume: every process starts from the same state
    for epoch in range(len(result.history) + 1, epochs + 1):
        if result.stopped_early:  # a run that had stopped, resumed before its outputs were written
            break
        per_batch = steps_per_batch(scheduler)
        train = train_one_epoch(trained, train_loader, optimizer, hw, scaler, aux_loss_weight,
                                desc=f"epoch {epoch}/{epochs} train", batch_scheduler=scheduler if per_batch else None,
                                world=world, loss=loss, mixer=mixer,
                                after_step=None if ema is None else partial(ema.update_parameters, model))
        if scheduler is not None and not per_batch:
            scheduler.step()  # once per epoch, after the optimizer's steps
        # Every process scores the model rank 0 keeps. The averages of the weights agree already
        # (every process steps alike); those of BatchNorm's statistics follow each one's share.
        for module in dict.fromkeys([model, scored]):
            world.sync_buffers(module)
        own = predict(scored, val_loader, hw, desc=f"epoch {epoch}/{epochs} val", show=world.main).stats
        val = all_processes(world, own.loss * own.images, own.accuracy * own.images, own.images, own.seconds)
        record = {"epoch": epoch, "train_loss": train.loss, "train_acc": train.accuracy,
                  "val_loss": val.loss, "val_acc": val.accuracy, "train_seconds": train.seconds,
                  "train_images_per_s": train.images_per_second, "val_seconds": val.seconds,
                  "peak_rss_mb": peak_rss_mb()}
        result.history.append(record)
        result.consider(epoch, val, scored)
        result.stopped_early = stopping.should_stop(val.accuracy, val.loss)
        rng = world.gather(rng_state(generators, hw.device))  # each process's own draws, for an exact resume
        if resume_path is not None and world.main:
            save_resume(resume_path, result, stateful, rng, hw)
        if world.main:  # once the epoch's state is saved: a run stopped after this line resumes after it
            print(f"epoch {epoch}/{epochs}: train loss {train.loss:.4f} acc {train.accuracy:.4f} | "
                  f"val loss {val.loss:.4f} acc {val.accuracy:.4f} | {train.images_per_second:.1f} img/s",
                  flush=True)
            if result.stopped_early:
                print(f"stopped early: no better val in {stopping.waited} epochs; the best is epoch "
                      f"{result.best_epoch}", flush=True)
        on_epoch(record)
    return result


def loader_generators(loader) -> list[torch.Generator]:
    """The generators a DataLoader draws its shuffling and worker seeds from."""
    found = [getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)]
    unique = {id(g): g for g in found if g is not None}
    return list(unique.values())


def rng_state(generators: list[torch.Generator], device: torch.device = torch.device("cpu")) -> dict:
    """This process's random number generators' states, as plain values and tensors: the CPU's,
    `device`'s own (dropout and stochastic depth draw there on a GPU), the loaders'."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "device": device_rng_state(device), "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "generators": [g.get_state() for g in generators]}


def device_rng_state(device: torch.device) -> torch.Tensor | None:
    """The default generator's state of a GPU (None on the CPU: torch's own is the CPU's)."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    if device.type == "mps":
        return torch.mps.get_rng_state()
    return None


def set_device_rng_state(device: torch.device, state: torch.Tensor | None) -> None:
    """Put back what device_rng_state saved (nothing, for a state saved on another kind of device)."""
    if state is None:
        return
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state)


def hardware_settings(hw: Hardware) -> dict:
    """What a run decided about its hardware, as a resume state keeps it (plain values)."""
    return {"device": hw.device.type, "precision": hw.precision, "channels_last": hw.channels_last,
            "tensor_batches": hw.tensor_batches, "workers": hw.workers,
            "decision": {k: v for k, v in hw.decision.items() if k != "auto_fields"}}


def save_resume(path: str | Path, result: FitResult, stateful: dict, rng: list[dict], hw: Hardware) -> None:
    """The state after an epoch (`rng`: each process's generators; `hw`'s decided settings):
    tensors and plain values only, so it loads with weights_only=True."""
    save_checkpoint(path, {
        "states": {name: obj.state_dict() for name, obj in stateful.items() if obj is not None},
        "rng": rng, "hardware": hardware_settings(hw),
        "best_state": result.best_state, "best_epoch": result.best_epoch,
        "best_val": asdict(result.best_val), "history": result.history})


RESUME_KEYS = {"states", "rng", "history", "hardware"}  # a state without "hardware" was written before it was kept


def read_resume(path: str | Path) -> dict | None:
    """The state saved after an epoch, or None. A state that cannot be read (truncated by a crash
    or a full disk, or not written by this transferlab) is derived data: removed, with a warning,
    and training starts again at epoch 1."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        saved = load_checkpoint(path)
        if not RESUME_KEYS <= set(saved) or not saved["history"] or not isinstance(saved["rng"], list):
            raise UserError("not a resume state of this version of transferlab")
        return saved
    except UserError as err:
        warn(f"{path}: unreadable resume state ({str(err).split('Cause: ')[-1]}); removed it, training "
             f"starts again at epoch 1")
        path.unlink(missing_ok=True)
        return None


def load_resume(path: str | Path | None, world: World = SINGLE) -> dict | None:
    """The resume state at `path`, read by rank 0 (the only one given a path), on every process."""
    return world.broadcast(read_resume(path) if path is not None and world.main else None)


def apply_resume(saved: dict, stateful: dict, generators: list[torch.Generator], rank: int = 0,
                 device: torch.device = torch.device("cpu")) -> FitResult:
    for name, obj in stateful.items():
        if obj is not None:
            obj.load_state_dict(saved["states"][name])
    rng = saved["rng"][rank]
    torch.set_rng_state(rng["torch"])
    set_device_rng_state(device, rng["device"])
    random.setstate(rng["python"])
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    for generator, state in zip(generators, rng["generators"]):
        generator.set_state(state)
    return FitResult(saved["best_state"], saved["best_epoch"], EpochStats(**saved["best_val"]), saved["history"])
