"""Device, precision, memory layout and input path: decided once, before the loop, so the loop has
no device branches.

`auto` is decided by measurement on the machine at hand, never by a rule from another machine
(bf16 is 3x faster on a CPU with AMX and slower on one with only AVX-512 BF16 or less; on a GPU at
batch 8 autocast adds cast kernels and channels-last slows depthwise convolutions). Each candidate
first runs every batch shape the run will meet twice: the first calls pay one-off costs, such as
cuDNN's autotuning, here and not mid-epoch (within a generous box of their own), and the second
calls, warm, must keep within twice the fastest candidate's, which drops a candidate that stalls
or that the hardware only emulates. Then the candidates take turns, in rounds shuffled afresh,
each timing sample long enough to rise above the timer's noise. A less precise or less common
candidate wins only when it beats the simplest by more than 5% in significantly many rounds (a
sign test on paired ratios): a tie, or a gain the rounds cannot show, keeps the simpler setting.
The winner, every candidate's timings and why any was dropped are recorded in the stage's
report, and cached by device, torch version, model and batch shapes, so a re-run does not
measure again. Every process pays its own first calls before the loop (`warm_up`). An explicit
setting in params.yaml is used as given.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import hashlib
import itertools
import json
import math
import platform
import random
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from scipy.stats import binomtest
from torch import nn

from transferlab.distributed import World
from transferlab.errors import UserError, warn
from transferlab.files import write_json
from transferlab.store import cpu_count

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Images per forward pass where only inference runs (the embedding pass) on an accelerator: at a
# train batch of 8 a GPU waits on kernel launches. A CPU keeps the loader's batches: more images
# per pass buy it nothing and hold more activations.
INFERENCE_IMAGES = 128


@dataclass(frozen=True)
class Hardware:
    """Everything device-dependent, decided once before the loop."""

    device: torch.device
    amp_dtype: torch.dtype | None   # autocast dtype, None for fp32
    channels_last: bool
    workers: int
    pin_memory: bool
    keep_freed_memory: bool         # glibc's malloc tuned by keep_freed_memory() in this process
    tensor_batches: bool = False    # augment batch-wise on tensors (data.TensorBatches), not per PIL image
    inference_images: int = 0       # images per pass of inference alone (0: the loader's batches)
    decision: dict = field(default_factory=dict, compare=False)  # how `auto` was decided, with timings

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # Only fp16 underflows; bf16 has fp32's exponent range.
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def prepare(self, model: nn.Module) -> nn.Module:
        model.to(self.device)
        return model.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=self.pin_memory)
        if self.channels_last and images.dim() == 4:  # cached embeddings may be flat
            return images.contiguous(memory_format=torch.channels_last)
        return images

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def describe(self) -> dict:
        return {"device": self.device.type, "precision": self.precision, "channels_last": self.channels_last,
                "workers": self.workers, "pin_memory": self.pin_memory, "keep_freed_memory": self.keep_freed_memory,
                "input_path": "tensor batches" if self.tensor_batches else "DataLoader + PIL",
                "auto_decision": self.decision or None}


def pick_hardware(device: str = "auto", precision: str = "auto", channels_last: bool | str = "auto",
                  workers: int | str = "auto", keep_memory: bool | str = "auto",
                  tensor_batches: bool | str = "auto") -> Hardware:
    """Resolve the device and the settings decided by rule, and apply the process-wide one (the
    memory allocator's); an explicit setting the machine lacks is an error. `auto` precision and
    layout stay fp32 and NCHW here until `decide` measures them (`auto_fields` says which); so does
    an `auto` input path on a CPU (tensor batches always on a GPU)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but torch sees no CUDA GPU; set device: auto or cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("train.device is mps but this torch has no MPS backend; set device: auto or cpu")
    if workers == "auto":
        # Images come decoded from the store and are augmented as tensor batches where that measures
        # faster; DataLoader workers would only compete with the compute threads on a CPU.
        workers = 0 if device == "cpu" else min(4, cpu_count())
    if keep_memory == "auto":
        keep_memory = device == "cpu" and keep_freed_memory()
    elif keep_memory and not keep_freed_memory():
        raise UserError("train.keep_freed_memory is true, but this C library is not glibc, whose malloc "
                        "it tunes; set it to auto or false")
    if device == "cuda" and not torch.are_deterministic_algorithms_enabled():
        torch.backends.cudnn.benchmark = True  # autotuned once per shape, during `decide`'s warm-up
    hw = Hardware(torch.device(device), DTYPES.get(precision), channels_last is True, int(workers),
                  pin_memory=device == "cuda", keep_freed_memory=bool(keep_memory),
                  tensor_batches=device != "cpu" if tensor_batches == "auto" else bool(tensor_batches),
                  inference_images=0 if device == "cpu" else INFERENCE_IMAGES)
    auto = [name for name, value in (("precision", precision), ("channels_last", channels_last),
                                     ("tensor_batches", tensor_batches)) if value == "auto"]
    return replace(hw, decision={"auto_fields": auto}) if auto else hw


@dataclass(frozen=True)
class Workload:
    """What a stage will run, for timing candidates: the model, its input size, and how many
    images each phase sees per epoch at which batch size. With several processes the images and
    batches are the whole run's, and each process computes its share of every batch."""

    model: nn.Module
    crop_size: int
    train_images: int      # 0: this stage trains nothing with the backbone (extract, evaluate)
    infer_images: int
    train_batch: int
    infer_batch: int
    processes: int = 1

    def _phases(self) -> tuple[tuple[int, int, bool], ...]:
        return (self.train_images, self.train_batch, True), (self.infer_images, self.infer_batch, False)

    def shapes(self, rank: int | None = None) -> list[tuple[int, bool]]:
        """Every (batch size, training?) process `rank` meets (any process, if None): its shares
        (World.shard) of the full batches and of the tail batch, training first, largest first."""
        found = set()
        for images, batch, train in self._phases():
            for size in {min(batch, images), images % batch} - {0}:
                for r in range(self.processes) if rank is None else [rank]:
                    found |= {(World(r, self.processes).share_size(size), train)} - {(0, train)}
        return sorted(found, key=lambda shape: (not shape[1], -shape[0]))

    def timed_phases(self) -> list[tuple[float, int, bool]]:
        """(images, batch size, training?) of each phase as process 0 runs it: its share of the
        images, at its share of a full batch."""
        phases = []
        for images, batch, train in self._phases():
            share = World(0, self.processes).share_size(min(batch, images))
            if share:
                phases.append((images / self.processes, share, train))
        return phases


INPUT_PATHS = {"DataLoader + PIL": False, "tensor batches": True}
# 4: inputs made on the device outside the timing, each shape warmed twice, why a candidate was
# dropped (3: shuffled rounds, every sample kept, a sign test; 2: rotated rounds, medians and noise)
DECISION_FORMAT = 4


def decide(hw: Hardware, work: Workload, cache_dir: Path, key_parts: list,
           input_seconds: Callable[[bool], float] | None = None) -> Hardware:
    """`hw` with its auto fields set to the fastest measured candidate and, on a CPU, the faster
    input path (`input_seconds(tensor_batches)` times one); measured once, then cached."""
    auto = hw.decision.get("auto_fields", [])
    measure_inputs = hw.device.type == "cpu" and input_seconds is not None and "tensor_batches" in auto
    model_auto = [name for name in auto if name != "tensor_batches"]
    if not model_auto and not measure_inputs:
        return replace(hw, decision={}) if auto else hw
    candidates = candidate_settings(hw, model_auto) if model_auto else {}
    key = hashlib.sha256(json.dumps([DECISION_FORMAT, machine_name(hw.device), torch.__version__,
                                     torch.get_num_threads(),
                                     work.crop_size, work.shapes(), key_parts, sorted(candidates),
                                     measure_inputs], sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = Path(cache_dir) / "hardware" / f"decision-{key}.json"
    cached = _read_decision(path, candidates, measure_inputs)
    measured_now = cached is None
    if measured_now:
        # Measuring draws random numbers; the run's own draws must not depend on whether it did.
        with torch.random.fork_rng(devices=[hw.device] if hw.device.type == "cuda" else []):
            samples, dropped = time_candidates(hw, candidates, work) if candidates else ({}, {})
            cached = {"model": {name: statistics.median(t) if t else None for name, t in samples.items()},
                      "samples": samples, "dropped": dropped,
                      "spread": {name: round(relative_spread(t), 4) for name, t in samples.items() if t},
                      "inputs": {name: input_seconds(tensor) for name, tensor in INPUT_PATHS.items()}
                      if measure_inputs else {}}
        write_json(path, cached)
    decision = {"seconds_per_image": cached, "measured_now": measured_now, "cache": str(path)}
    if candidates:
        if not any(cached["samples"].values()):
            raise UserError(none_usable(hw.device, cached.get("dropped", {})))
        decision["margin"] = MIN_MARGIN
        decision["chosen"] = best = choose(cached["samples"], list(candidates))
        hw = replace(hw, amp_dtype=DTYPES[candidates[best]["precision"]],
                     channels_last=candidates[best]["channels_last"])
    if measure_inputs:
        decision["input_path"] = path_name = pick_fastest(cached["inputs"], list(INPUT_PATHS))
        hw = replace(hw, tensor_batches=INPUT_PATHS[path_name])
    return replace(hw, decision=decision)


def none_usable(device: torch.device, dropped: dict[str, str]) -> str:
    """The message when every candidate failed or stalled: each one's reason, and what to do."""
    reasons = "; ".join(f"{name}: {why}" for name, why in dropped.items())
    advice = "set train.precision and train.channels_last explicitly"
    if "deterministic" in reasons:
        advice = (f"this model has a layer without a deterministic kernel on {device.type}: set train.deterministic "
                  f"to false, or {advice}")
    return f"every candidate setting failed or stalled on {device}: {reasons}; {advice}"


def pick_fastest(timings: dict[str, float], order: list[str], margin: float = 0.05) -> str:
    """The fastest candidate; within `margin` of it, the earliest in `order` (the simpler setting)."""
    fastest = min(timings.values())
    return next(name for name in order if name in timings and timings[name] <= fastest * (1 + margin))


def candidate_settings(hw: Hardware, auto: list[str]) -> dict[str, dict]:
    """Candidates for the auto fields, simplest first (fp32, NCHW)."""
    precisions = [hw.precision]
    if "precision" in auto:
        precisions = ["fp32", "bf16"]
        if hw.device.type == "cuda":  # bf16 only with its own kernels: emulated (V100, T4) it is slow
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            precisions = ["fp32", "bf16", "fp16"] if bf16 else ["fp32", "fp16"]
        elif hw.device.type == "mps":
            precisions = ["fp32", "fp16"]
    layouts = [False, True] if "channels_last" in auto else [hw.channels_last]
    return {f"{p}{' + channels-last' if cl else ''}": {"precision": p, "channels_last": cl}
            for p in precisions for cl in layouts}


# A candidate other than the simplest must be faster than it by more than this, in significantly
# many rounds: a smaller gain is not worth a less precise or less common setting.
MIN_MARGIN = 0.05
# The rounds: at least MIN_ROUNDS (a one-sided sign test at 1% needs 11 wins of 12 to decide), more
# while they fit in ROUNDS_SECONDS, up to MAX_ROUNDS. A timed sample repeats a step until it takes
# SAMPLE_SECONDS (timeit's autorange): a step of a tenth of a millisecond is mostly timer and
# scheduler noise on its own.
MIN_ROUNDS, MAX_ROUNDS, ROUNDS_SECONDS, SAMPLE_SECONDS = 12, 40, 3.0, 0.005
# 1%, not 5%: on a loaded machine a round's noise can dwarf the margin, and a test at 5% would then
# crown an equal candidate in one decision of twenty.
SIGN_TEST_ALPHA = 0.01
# The warm-up's boxes: a candidate's first calls of every shape (cuDNN's autotuning, kernel
# builds: seconds, for some layouts and dtypes more than the fastest candidate's) within
# FIRST_CALLS_SECONDS; its warm calls within twice the fastest candidate's, plus STALL_SECONDS.
FIRST_CALLS_SECONDS, STALL_SECONDS = 60.0, 1.0


def time_candidates(hw: Hardware, candidates: dict[str, dict],
                    work: Workload) -> tuple[dict[str, list[float] | None], dict[str, str]]:
    """Seconds per image of each candidate, one sample per round (None if dropped), simplest
    first; and why each dropped one was dropped.

    Every candidate first warms up every batch shape twice (see `_warm_up`); one that fails, or
    stalls, is dropped. Then each round times every candidate once, in an order shuffled afresh:
    a machine that slows down or speeds up while measuring (another process, turbo, heat) favours
    none of them, and neither does what one candidate leaves behind for the next (caches, freed
    memory), which a fixed rotation would always hand to the same successor."""
    model = copy.deepcopy(work.model)  # one copy for all: layout is switched, precision is autocast
    steppers, dropped, fastest = {}, {}, None
    for name, settings in candidates.items():
        step, outcome = _warm_up(hw, settings, work, model, fastest)
        if step is None:
            dropped[name] = outcome
            continue
        steppers[name] = step
        fastest = outcome if fastest is None or sum(outcome) < sum(fastest) else fastest
    # Every candidate repeats each step as often as the fastest needs: the same number of steps per
    # sample, so that what a switch between candidates costs weighs on all of them alike.
    shared = {phase: max(step.repeats[phase] for step in steppers.values()) for phase in
              next(iter(steppers.values())).repeats} if steppers else {}
    for step in steppers.values():
        step.repeats = dict(shared)
    samples = run_rounds(steppers)
    return {name: samples.get(name) for name in candidates}, dropped


def run_rounds(steppers: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Each stepper's timings, one per round: the order of each round shuffled, and every second
    round the reverse of the one before, so that each candidate takes every place in a round
    equally often (seeded: the same orders on every run)."""
    samples = {name: [] for name in steppers}
    order, shuffle = list(steppers), random.Random(0).shuffle
    start = time.perf_counter()
    for rounds in range(MAX_ROUNDS if steppers else 0):
        if rounds >= MIN_ROUNDS and time.perf_counter() - start > ROUNDS_SECONDS:
            break
        if rounds % 2:
            order.reverse()
        else:
            shuffle(order)
        for name in order:
            samples[name].append(steppers[name]())
    return samples


def choose(samples: dict[str, list[float]], order: list[str], margin: float = MIN_MARGIN) -> str:
    """The simplest usable candidate (first in `order`), unless another is faster than it by more
    than `margin` in significantly many rounds: a one-sided sign test on the per-round ratios,
    which holds whatever the timings' distribution (the upper 95% bound of the median ratio is
    below 1 / (1 + margin)). Among those that pass, the fastest median, or the simplest within
    `margin` of it."""
    usable = [name for name in order if samples.get(name)]
    base = usable[0]
    medians = {name: statistics.median(samples[name]) for name in usable}
    faster = [name for name in usable[1:] if _surely_faster(samples[name], samples[base], margin)]
    return pick_fastest({name: medians[name] for name in [base] + faster}, usable, margin) if faster else base


def _surely_faster(candidate: list[float], base: list[float], margin: float) -> bool:
    wins = sum(c * (1 + margin) < b for c, b in zip(candidate, base))  # paired: the same round
    return binomtest(wins, min(len(candidate), len(base)), 0.5, alternative="greater").pvalue < SIGN_TEST_ALPHA


def relative_spread(samples: list[float]) -> float:
    """Interquartile range over median: how noisy a candidate's timings were (reported, not used)."""
    if len(samples) < 2:
        return 0.0
    low, _, high = statistics.quantiles(samples, n=4, method="inclusive")
    return (high - low) / statistics.median(samples)


def _warm_up(hw: Hardware, settings: dict, work: Workload, model: nn.Module,
             fastest: list[float] | None = None) -> tuple[Callable[[], float] | None, list[float] | str]:
    """(A function that times one round of the candidate: seconds per epoch-weighted image, each
    phase at full batch, its step repeated to SAMPLE_SECONDS; its warm seconds per shape), or
    (None, why it was dropped).

    Every shape runs twice, shape after shape. The first calls pay what is paid once (cuDNN's
    autotuning, kernel builds), which can take the fastest candidate longer than a slower one:
    they are only boxed by FIRST_CALLS_SECONDS in all. The warm calls, so far, must keep within
    twice `fastest` (the fastest candidate's warm seconds per shape) plus STALL_SECONDS: an
    emulated dtype is dropped after its first shape."""
    trial = replace(hw, amp_dtype=DTYPES[settings["precision"]], channels_last=settings["channels_last"])
    step, shapes = _stepper(model, trial), work.shapes(rank=0)
    warm_limits = [math.inf] * len(shapes) if fastest is None else \
        [2 * total + STALL_SECONDS for total in itertools.accumulate(fastest)]
    first, warm = 0.0, []
    try:
        trial.prepare(model)
        for (size, train), limit in zip(shapes, warm_limits):
            first += _seconds(step, size, train, work.crop_size)
            warm.append(_seconds(step, size, train, work.crop_size))
            if first > FIRST_CALLS_SECONDS:
                return None, f"stalled: its first calls took more than {FIRST_CALLS_SECONDS:.0f} s"
            if sum(warm) > limit:
                return None, "stalled: warm, it ran more than twice as long as the fastest candidate"
    except (RuntimeError, NotImplementedError) as err:  # an op without a kernel for this dtype/layout
        reason = f"{type(err).__name__}: {str(err).splitlines()[0]}"
        warn(f"hardware candidate {settings} failed on {hw.device}: {reason}")
        return None, f"failed: {reason}"
    seconds = dict(zip(shapes, warm))
    repeats = {(size, train): min(100, max(1, math.ceil(SAMPLE_SECONDS / max(seconds[size, train], 1e-6))))
               for _, size, train in work.timed_phases()}
    return RoundTimer(trial, step, model, work, repeats), warm


@dataclass
class RoundTimer:
    """Times one round of a candidate: seconds per epoch-weighted image, each phase at full batch,
    its step repeated `repeats[(size, train)]` times (time_candidates makes them the same for every
    candidate)."""
    trial: Hardware
    step: Callable[[int, bool, int], None]
    model: nn.Module
    work: Workload
    repeats: dict

    def __call__(self) -> float:
        self.trial.prepare(self.model)  # the candidates share the model: its layout, switched outside the timing
        cost, images_in_all = 0.0, 0.0
        for images, size, train in self.work.timed_phases():
            repeats = self.repeats[size, train]
            t0 = time.perf_counter()
            for _ in range(repeats):
                self.step(size, train, self.work.crop_size)
            cost += images * (time.perf_counter() - t0) / (repeats * size)
            images_in_all += images
        return cost / images_in_all


def _seconds(step: Callable[[int, bool, int], None], size: int, train: bool, crop: int) -> float:
    start = time.perf_counter()
    step(size, train, crop)
    return time.perf_counter() - start


def warm_up(hw: Hardware, work: Workload, rank: int = 0) -> None:
    """Run every batch shape process `rank` meets once, at `hw`'s settings, on a copy of the model:
    its first calls (cuDNN's autotuning, kernel builds) are paid before the loop, on every process
    and whether or not `decide` measured. A CPU has nothing to pay."""
    if hw.device.type == "cpu":
        return
    model = hw.prepare(copy.deepcopy(work.model))  # a copy: training steps move BatchNorm statistics
    step = _stepper(model, hw)
    for size, train in work.shapes(rank):
        step(size, train, work.crop_size)


# What waits for a device's queued work: a timing must include the work, not only its launch.
SYNCHRONIZE: dict[str, Callable[[], None]] = {"cuda": lambda: torch.cuda.synchronize(),
                                              "mps": lambda: torch.mps.synchronize()}


def _stepper(model: nn.Module, hw: Hardware) -> Callable[[int, bool, int], None]:
    """One training step (forward, backward, optimizer) or one inference forward on random input;
    `model` must be in `hw`'s layout already."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0, momentum=0.9) if params else None
    scaler = hw.grad_scaler()
    synchronize = SYNCHRONIZE.get(hw.device.type, lambda: None)
    # Inputs made once per shape, on the device, in the layout: drawing them and copying them there
    # is no part of a step's cost. Their own generator: the run's draws do not depend on them.
    inputs, noise = {}, torch.Generator().manual_seed(0)

    def step(size: int, train: bool, crop: int) -> None:
        if (size, crop) not in inputs:
            inputs[size, crop] = hw.to_device(torch.randn(size, 3, crop, crop, generator=noise))
        images = inputs[size, crop]
        if train and optimizer is not None:
            model.train()
            with hw.autocast():
                output = model(images)
                logits = output if isinstance(output, torch.Tensor) else output[0]
                loss = logits.float().logsumexp(1).mean()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            model.eval()
            with torch.no_grad(), hw.autocast():
                model(images)
        synchronize()
    return step


def _read_decision(path: Path, candidates: dict, measure_inputs: bool) -> dict | None:
    """Cached timings, or None when absent or unreadable (then measured again, with a warning)."""
    if not path.exists():
        return None
    try:
        cached = json.loads(path.read_text())
        times = [t for run in cached["samples"].values() if run for t in run] + list(cached["inputs"].values())
        if set(cached["samples"]) != set(candidates) or bool(cached["inputs"]) != measure_inputs \
                or not all(t > 0 for t in times):
            raise ValueError("not the candidates asked for")
        return cached
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        warn(f"{path}: unreadable ({err}); measuring the candidates again")
        return None


def machine_name(device: torch.device) -> str:
    """What identifies the hardware a decision was measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                      if line.startswith("model name")), cpu)
        flags = next((line.split(":", 1)[1] for line in info.splitlines() if line.startswith("flags")), "")
        cpu = f"{model} [{hashlib.sha256(flags.encode()).hexdigest()[:8]}]"
    except OSError:
        pass
    return f"{device.type}: {cpu}"


# Data kept on an accelerator (decoded images, cached embeddings) may take this share of the
# memory free when it is uploaded: the rest is the model's, its activations' and its optimizer's.
RESIDENT_SHARE = 0.25


def _cuda_free(device: torch.device) -> int:
    # Free now, not in total: another experiment of `dvc queue start -j 2`, or another tenant, may
    # hold the rest. What this process's allocator keeps cached is free to it.
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _mps_free(device: torch.device) -> int:
    # A Mac's GPU shares the machine's memory: what Metal recommends it use, less what it holds.
    return max(0, torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())


FREE_MEMORY: dict[str, Callable[[torch.device], int]] = {"cuda": _cuda_free, "mps": _mps_free}


def residency_budget(device: torch.device) -> int:
    """Bytes of data that may stay on `device` (0 on a CPU, which maps the files instead)."""
    return int(FREE_MEMORY.get(device.type, lambda device: 0)(device) * RESIDENT_SHARE)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt() parameters, from glibc's malloc.h


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    Every training step frees its activations and allocates them again; by default glibc returns
    such blocks to the OS, and touching them again costs a page fault per 4 KiB (measured on an AMX
    CPU: squeezenet trains 20-25% faster without that, at the same peak memory). Blocks up to
    32 MiB (glibc's ceiling) then come from the heap, and up to 1 GiB of free heap is kept. Returns
    whether it applied: False where the C library is not glibc (macOS, Windows, musl).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
