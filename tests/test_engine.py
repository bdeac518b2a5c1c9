import platform
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import CLASS_COLORS, make_image
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from transferlab.data import ImageDataset, build_transform, make_loader
from transferlab.engine import (
    EpochStats,
    FitResult,
    apply_resume,
    fit,
    fused_optimizer,
    make_optimizer,
    make_scheduler,
    peak_device_memory_mb,
    predict,
    read_resume,
    rng_state,
    save_resume,
    seed_everything,
    set_train_mode,
)
from transferlab.errors import UserError
from transferlab.hardware import pick_hardware
from transferlab.images import Sample
from transferlab.models import Preprocess
from transferlab.recipes import BatchMixer, criterion
from transferlab.store import open_store

PRE = Preprocess(crop_size=24, resize_size=28, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
CLASSES = list(CLASS_COLORS)


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, len(CLASSES)))


@pytest.fixture(scope="module")
def loaders_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("colors")
    def samples(split, n):
        return [Sample(str(make_image(root / split / f"{c}{i}.png", color, seed=hash((split, c, i)) % 999)), c)
                for c, color in CLASS_COLORS.items() for i in range(n)]
    train, val = samples("train", 12), samples("val", 6)
    return train, val, open_store(train + val, PRE.resize_size, root / "cache")


def run_fit(loaders_data, epochs=4, precision="fp32", workers=0, scheduler="none", seed=0, resume_path=None,
            lr=0.05, patience=0, step_hook=None, **recipes):
    """`recipes`: fit's loss, mixer, ema_decay; `step_hook(optimizer)` after every optimizer step."""
    seed_everything(seed)
    hw = pick_hardware("cpu", precision, "auto", workers)
    train, val, store = loaders_data
    train_loader = make_loader(ImageDataset(train, CLASSES, build_transform(PRE, True), store), 4, True, seed, workers)
    val_loader = make_loader(ImageDataset(val, CLASSES, build_transform(PRE, False), store), 4, False, seed, workers)
    model = tiny_net()
    optimizer = make_optimizer(list(model.parameters()), "sgd", lr, 0.9, 0.0)
    sched = make_scheduler(optimizer, scheduler, epochs, step_size=1, gamma=0.5)
    if step_hook is not None:
        optimizer.register_step_post_hook(lambda optimizer, args, kwargs: step_hook(model))
    result = fit(model, train_loader, val_loader, optimizer, sched, epochs, hw, resume_path=resume_path,
                 patience=patience, **recipes)
    return result, model, val_loader, hw, optimizer


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_learns_a_trivially_separable_dataset(loaders_data, precision):
    result, *_ = run_fit(loaders_data, epochs=5, precision=precision)
    assert result.best_val.accuracy == 1.0
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_keeps_the_best_val_epoch(loaders_data):
    result, model, val_loader, hw, _ = run_fit(loaders_data, epochs=4)
    best = max(result.history, key=lambda r: (r["val_acc"], -r["val_loss"]))
    assert result.best_epoch == best["epoch"] and result.best_val.loss == best["val_loss"]
    model.load_state_dict(result.best_state)
    again = predict(model, val_loader, hw).stats
    assert again.accuracy == best["val_acc"] and again.loss == pytest.approx(best["val_loss"], rel=1e-6)


def test_same_seed_same_metrics_with_workers(loaders_data):
    first, *_ = run_fit(loaders_data, epochs=2, workers=2)
    second, *_ = run_fit(loaders_data, epochs=2, workers=2)
    other, *_ = run_fit(loaders_data, epochs=2, workers=2, seed=1)
    keys = ("train_loss", "val_loss", "val_acc")
    assert [[r[k] for k in keys] for r in first.history] == [[r[k] for k in keys] for r in second.history]
    assert first.history[0]["train_loss"] != other.history[0]["train_loss"]


def test_scheduler_steps_after_the_optimizer(loaders_data):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns if the scheduler steps before the optimizer
        *_, optimizer = run_fit(loaders_data, epochs=2, scheduler="step")
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.25)


def test_frozen_batchnorm_keeps_its_statistics():
    model = tiny_net()
    model[0].requires_grad_(False), model[1].requires_grad_(False)
    set_train_mode(model)
    assert not model[1].training and model[5].training


def test_hardware_choices():
    hw = pick_hardware("cpu", "fp32", False, 0, False, False)
    assert hw.describe() == {"device": "cpu", "precision": "fp32", "channels_last": False, "workers": 0,
                             "pin_memory": False, "keep_freed_memory": False, "input_path": "DataLoader + PIL",
                             "auto_decision": None}
    auto = pick_hardware("cpu")
    assert auto.workers == 0 and auto.decision == {"auto_fields": ["precision", "channels_last", "tensor_batches"]}
    assert pick_hardware("cpu", "fp32", False, 0, False, True).tensor_batches  # the input path, pinned
    assert auto.keep_freed_memory == (platform.libc_ver()[0] == "glibc")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            pick_hardware("cuda")


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_run_ends_where_an_uninterrupted_one_does(loaders_data, tmp_path, workers):
    uninterrupted, *_ = run_fit(loaders_data, epochs=4, workers=workers, scheduler="step")
    resume = tmp_path / "resume.pt"
    run_fit(loaders_data, epochs=2, workers=workers, scheduler="step", resume_path=resume)  # "killed" after 2
    # A new process would start from scratch: other seeds, fresh model; the file must restore it all.
    torch.manual_seed(123)
    resumed, model, *_ = run_fit(loaders_data, epochs=4, workers=workers, scheduler="step", seed=0,
                                 resume_path=resume)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    keys = ("train_loss", "train_acc", "val_loss", "val_acc")
    assert [[r[k] for k in keys] for r in resumed.history] == [[r[k] for k in keys] for r in uninterrupted.history]
    assert resumed.best_epoch == uninterrupted.best_epoch
    assert all(torch.equal(resumed.best_state[k], uninterrupted.best_state[k]) for k in uninterrupted.best_state)


@pytest.mark.parametrize("damage", ["pickled code", "truncated"])
def test_an_unreadable_resume_state_is_removed_and_training_starts_at_epoch_1(tmp_path, loaders_data, capfd,
                                                                              damage):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))

    resume = tmp_path / "resume.pt"
    if damage == "pickled code":
        resume.write_bytes(pickle.dumps({"states": Payload()}))
    else:
        run_fit(loaders_data, epochs=1, resume_path=resume)
        resume.write_bytes(resume.read_bytes()[:1000])
    result, *_ = run_fit(loaders_data, epochs=2, resume_path=resume)
    assert [r["epoch"] for r in result.history] == [1, 2]
    err = capfd.readouterr()
    assert "this ran" not in err.out
    assert f"{resume}: unreadable resume state" in err.err and "training starts again at epoch 1" in err.err


def test_onecycle_steps_per_batch_and_warm_up_per_epoch(loaders_data):
    model = tiny_net()
    optimizer = make_optimizer([{"params": list(model[:2].parameters()), "lr": 0.01},
                                {"params": list(model[5].parameters()), "lr": 0.1}], "adam", 0.1, 0.9, 0.0)
    schedule = make_scheduler(optimizer, "onecycle", epochs=2, step_size=1, gamma=0.5, steps_per_epoch=6)
    lrs = []
    for _ in range(12):
        optimizer.step()
        schedule.step()
        lrs.append([g["lr"] for g in optimizer.param_groups])
    peak = max(range(12), key=lambda i: lrs[i][1])
    assert 0 < peak < 11 and lrs[-1][1] < lrs[0][1] and lrs[3][1] / lrs[3][0] == pytest.approx(10)
    warm = make_scheduler(make_optimizer(list(tiny_net().parameters()), "sgd", 0.1, 0.9, 0.0), "cosine", 6, 1, 0.5,
                          warmup_epochs=2)
    seen = []
    for _ in range(6):
        seen.append(warm.optimizer.param_groups[0]["lr"])
        warm.optimizer.step()
        warm.step()
    assert seen[0] == pytest.approx(0.01) and seen[2] == pytest.approx(0.1) and seen[5] < seen[3]


def test_fit_with_onecycle_ends_at_a_tiny_lr(loaders_data):
    seed_everything(0)
    hw = pick_hardware("cpu", "fp32", False, 0)
    train, val, store = loaders_data
    train_loader = make_loader(ImageDataset(train, CLASSES, build_transform(PRE, True), store), 4, True, 0)
    val_loader = make_loader(ImageDataset(val, CLASSES, build_transform(PRE, False), store), 4, False, 0)
    model = tiny_net()
    optimizer = make_optimizer(list(model.parameters()), "sgd", 0.05, 0.9, 0.0)
    schedule = make_scheduler(optimizer, "onecycle", 3, 1, 0.5, steps_per_epoch=len(train_loader))
    fit(model, train_loader, val_loader, optimizer, schedule, 3, hw)
    assert schedule.last_epoch == 3 * len(train_loader)  # stepped after every batch
    assert optimizer.param_groups[0]["lr"] < 0.05 / 25  # annealed below where it started


aten = torch.ops.aten


class OnAnotherDevice(TorchDispatchMode):
    """Runs what the loop runs on the meta device, standing for a GPU (an Apple one has no
    float64), and records every float64 tensor made off the CPU. A read back to the host (a
    copy to the CPU, `.item()`) of a meta tensor, which has no values, gives zeros."""

    def __init__(self):
        super().__init__()
        self.float64, self.reads = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        source = next((a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)), None)
        if source is not None and source.device.type == "meta":
            if func is aten._local_scalar_dense.default:
                self.reads.append(func)
                return 0
            if func is aten._to_copy.default and kwargs.get("device") == torch.device("cpu"):
                self.reads.append(func)
                return torch.zeros(source.shape, dtype=kwargs.get("dtype") or source.dtype)
        out = func(*args, **kwargs)
        self.float64 += [func for t in tree_flatten(out)[0]
                         if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type != "cpu"]
        return out


def test_no_float64_tensor_is_made_on_the_device(loaders_data):
    """MPS has no float64, and `device: auto` picks it on every Apple-silicon Mac: training and
    val must add up and take softmax in float64 on the host only."""
    train, val, store = loaders_data
    hw = replace(pick_hardware("cpu", "fp32", False, 0, False, False), device=torch.device("meta"))
    train_loader = make_loader(ImageDataset(train, CLASSES, build_transform(PRE, True), store), 4, True, 0)
    val_loader = make_loader(ImageDataset(val, CLASSES, build_transform(PRE, False), store), 4, False, 0)
    model = tiny_net()
    optimizer = make_optimizer(list(model.parameters()), "sgd", 0.05, 0.9, 0.0)
    with OnAnotherDevice() as device:
        result = fit(model, train_loader, val_loader, optimizer, None, 2, hw)
        predictions = predict(model, val_loader, hw)
    assert [r["epoch"] for r in result.history] == [1, 2] and predictions.probs.dtype == np.float64
    assert device.reads and device.float64 == []


def test_deterministic_asks_for_deterministic_kernels_and_warns_where_there_are_none():
    """vgg, alexnet and googlenet's adaptive average pooling has no deterministic CUDA backward:
    with `deterministic: true` they must train (warning), not crash."""
    try:
        seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)


def test_a_resume_state_keeps_the_device_generator_of_each_process(tmp_path, monkeypatch, loaders_data):
    """Dropout and stochastic depth draw from the GPU's generator: a resumed run must not replay
    epoch 1's masks. Faked: there is no GPU here."""
    device = torch.device("cuda", 1)
    draws, restored = {1: torch.tensor([7, 7], dtype=torch.uint8)}, {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda index="cuda": draws[torch.device(index).index].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index="cuda": restored.update(
        {torch.device(index).index: state}))
    hw = replace(pick_hardware("cpu", "fp32", False, 0, False, False), device=device)
    result = FitResult(history=[{"epoch": 1}], best_val=EpochStats(0.5, 1.0, 4, 1.0))
    save_resume(tmp_path / "resume.pt", result, {}, [rng_state([], device)], hw)
    draws[1] = torch.tensor([9, 9], dtype=torch.uint8)  # later draws moved it on
    apply_resume(read_resume(tmp_path / "resume.pt"), {}, [], 0, device)
    assert restored.keys() == {1} and restored[1].tolist() == [7, 7]


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_a_fused_optimizer_takes_an_fp16_step_without_reading_the_device(name):
    """GradScaler.step reads its inf check back to the host (`.item()`, a synchronisation per
    step) unless the optimizer is fused: fused on CUDA. Checked on the CPU, which has the kernels."""
    assert fused_optimizer(torch.device("cuda")) and not fused_optimizer(torch.device("cpu"))
    reads = {}
    for fused in (False, True):
        weight = nn.Parameter(torch.randn(3))
        optimizer, scaler = make_optimizer([weight], name, 0.1, 0.9, 0.0, fused), torch.amp.GradScaler("cpu")
        scaler.scale(weight.square().sum()).backward()
        with Recorder() as calls:
            scaler.step(optimizer)
            scaler.update()
        reads[fused] = calls.count(aten._local_scalar_dense.default)
    assert reads[False] >= 1 and reads[True] == 0


class Recorder(TorchDispatchMode, list):
    """Every op run, in order."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.append(func)
        return func(*args, **(kwargs or {}))


def test_peak_gpu_memory_is_reported_where_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20 if device.index == 1 else 0)
    assert peak_device_memory_mb(torch.device("cuda", 1)) == 3.0
    assert peak_device_memory_mb(torch.device("cpu")) is None


def test_patience_stops_a_run_whose_val_stops_improving(loaders_data):
    """lr 0: val never changes, so after the first epoch no check is better; patience 2 stops the
    run after epoch 3 of a cap of 8, keeping epoch 1."""
    stopped, *_ = run_fit(loaders_data, epochs=8, lr=0.0, patience=2)
    assert [r["epoch"] for r in stopped.history] == [1, 2, 3] and stopped.stopped_early and stopped.best_epoch == 1
    learning, *_ = run_fit(loaders_data, epochs=3, patience=2)
    assert len(learning.history) == 3 and not learning.stopped_early
    held, *_ = run_fit(loaders_data, epochs=8, lr=0.0, patience=2, min_epochs=5)  # not before epoch 5
    assert [r["epoch"] for r in held.history] == [1, 2, 3, 4, 5] and held.stopped_early and held.best_epoch == 1


def test_a_run_resumed_before_its_early_stop_stops_where_an_uninterrupted_one_does(loaders_data, tmp_path):
    uninterrupted, *_ = run_fit(loaders_data, epochs=8, lr=0.0, patience=2)
    resume = tmp_path / "resume.pt"
    run_fit(loaders_data, epochs=2, lr=0.0, patience=2, resume_path=resume)  # "killed" after 2
    torch.manual_seed(123)
    resumed, *_ = run_fit(loaders_data, epochs=8, lr=0.0, patience=2, resume_path=resume)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3] and resumed.stopped_early
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in uninterrupted.history]
    again, *_ = run_fit(loaders_data, epochs=8, lr=0.0, patience=2, resume_path=resume)  # stopped, not yet written
    assert [r["epoch"] for r in again.history] == [1, 2, 3] and again.stopped_early
    held = tmp_path / "held.pt"  # min_epochs: the replayed checks count towards it
    run_fit(loaders_data, epochs=2, lr=0.0, patience=2, min_epochs=5, resume_path=held)
    resumed, *_ = run_fit(loaders_data, epochs=8, lr=0.0, patience=2, min_epochs=5, resume_path=held)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4, 5] and resumed.stopped_early


def same_run(a: FitResult, b: FitResult) -> bool:
    keys = ("train_loss", "train_acc", "val_loss", "val_acc")
    return ([[r[k] for k in keys] for r in a.history] == [[r[k] for k in keys] for r in b.history]
            and all(torch.equal(a.best_state[k], b.best_state[k]) for k in a.best_state))


@pytest.mark.parametrize("recipe", [
    {"loss": criterion(0.2)},
    {"mixer": BatchMixer(len(CLASSES), mixup_alpha=0.4)},
    {"mixer": BatchMixer(len(CLASSES), cutmix_alpha=1.0)},
    {"ema_decay": 0.9},
], ids=["label_smoothing", "mixup", "cutmix", "ema"])
def test_each_recipe_changes_training_and_off_is_the_plain_loop(loaders_data, recipe):
    plain, *_ = run_fit(loaders_data, epochs=2)
    off, *_ = run_fit(loaders_data, epochs=2, loss=criterion(0.0), mixer=None, ema_decay=0.0)
    assert same_run(off, plain)  # what a run with every key at its default did before the recipes
    on, *_ = run_fit(loaders_data, epochs=2, **recipe)
    assert not same_run(on, plain)
    if "ema_decay" in recipe:  # the average follows training without changing it
        assert [r["train_loss"] for r in on.history] == [r["train_loss"] for r in plain.history]
    again, *_ = run_fit(loaders_data, epochs=2, **recipe)
    assert same_run(again, on)  # the same seed, the same run


def test_mixed_training_counts_accuracy_against_the_hard_targets(loaders_data):
    result, *_ = run_fit(loaders_data, epochs=3, mixer=BatchMixer(len(CLASSES), mixup_alpha=0.4))
    assert all(r["train_acc"] in {i / 24 for i in range(25)} for r in result.history)  # hits of 24 images
    assert result.history[-1]["train_acc"] > 0.5


def test_validation_scores_and_the_best_epoch_keeps_the_weights_average(loaders_data):
    """The average taken by hand over the weights after each step is what the best epoch kept, and
    the val loss recorded is that of those weights."""
    steps = []
    decay = 0.8
    result, model, val_loader, hw, _ = run_fit(loaders_data, epochs=1, ema_decay=decay,
                                               step_hook=lambda m: steps.append(
                                                   {k: v.detach().clone() for k, v in m.state_dict().items()}))
    assert len(steps) == 6  # 24 images in batches of 4
    average = dict(steps[0])
    for n, weights in enumerate(steps[1:], start=1):  # n: the updates before this one (recipes.averaged)
        rate = 1 - min(decay, (1 + n) / (10 + n))
        average = {k: v if not v.is_floating_point() else (1 - rate) * v + rate * weights[k]
                   for k, v in average.items()}
    floats = [name for name, value in average.items() if value.is_floating_point()]  # BatchNorm's statistics too
    assert all(torch.allclose(result.best_state[name], average[name], atol=1e-6) for name in floats)
    assert not all(torch.allclose(result.best_state[name], steps[-1][name]) for name in floats)  # not the last
    model.load_state_dict(result.best_state)
    assert predict(model, val_loader, hw).stats.loss == pytest.approx(result.history[0]["val_loss"], abs=1e-9)


def test_a_resumed_run_with_the_recipes_ends_where_an_uninterrupted_one_does(loaders_data, tmp_path):
    """The weights' average is in the resume state; mixing draws from torch's generator, which it keeps."""
    def recipes():
        return {"loss": criterion(0.1), "mixer": BatchMixer(len(CLASSES), 0.4, 1.0), "ema_decay": 0.7}
    uninterrupted, *_ = run_fit(loaders_data, epochs=4, scheduler="step", **recipes())
    resume = tmp_path / "resume.pt"
    run_fit(loaders_data, epochs=2, scheduler="step", resume_path=resume, **recipes())  # "killed" after 2
    assert "ema" in read_resume(resume)["states"]
    resumed, *_ = run_fit(loaders_data, epochs=4, scheduler="step", resume_path=resume, **recipes())
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    assert same_run(resumed, uninterrupted) and resumed.best_epoch == uninterrupted.best_epoch
