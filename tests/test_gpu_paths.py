"""What a GPU or a Mac runs, checked on the CPU: the meta device stands in for the accelerator
(tensors with shapes, dtypes and devices but no data), FakeTensorMode for CUDA where values must
flow, and recording fakes for what only the accelerator's runtime answers (free memory, pinned
memory, synchronisation)."""
import runpy
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import make_image
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from transferlab import hardware
from transferlab.data import DeviceImages, ImageSource
from transferlab.features import embed
from transferlab.hardware import Hardware, Workload, _stepper, _warm_up, residency_budget
from transferlab.images import Sample
from transferlab.models import Preprocess
from transferlab.store import open_store

PRE = Preprocess(crop_size=32, resize_size=40, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))
CLASSES = ["a", "b"]
ROOT = Path(__file__).resolve().parents[1]


def on(device: str, pin_memory: bool = False, channels_last: bool = False) -> Hardware:
    return Hardware(torch.device(device), None, channels_last, 0, pin_memory=pin_memory, keep_freed_memory=False,
                    tensor_batches=True)


class Recorder(TorchDispatchMode):
    """Every aten call: its name, the devices and dtype of what it made, and, for copies, from
    where to where, whether it waits, and the address it read."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        made = out if isinstance(out, torch.Tensor) else None
        on_host = source is not None and source.device.type == "cpu"
        self.calls.append({"op": str(func), "source": source.device.type if source is not None else None,
                           "device": made.device.type if made is not None else None,
                           "dtype": made.dtype if made is not None else None,
                           "bytes": made.nelement() * made.element_size() if made is not None else 0,
                           "non_blocking": bool(kwargs.get("non_blocking", False)),
                           "address": source.data_ptr() if on_host else None})
        return out

    def uploads(self) -> list[dict]:
        return [c for c in self.calls if c["op"] in ("aten._to_copy.default", "aten.copy_.default")
                and c["source"] == "cpu" and c["device"] not in (None, "cpu")]

    def downloads(self) -> list[dict]:
        return [c for c in self.calls if c["op"] == "aten._to_copy.default" and c["source"] not in (None, "cpu")
                and c["device"] == "cpu"]


class OutOfDeviceMemory(TorchDispatchMode):
    """A device with room for a batch but not for every image at once."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.device.type == "meta" and out.nelement() > self.limit:
            raise torch.OutOfMemoryError(f"fake: {out.nelement()} bytes do not fit")
        return out


@pytest.fixture
def data(tmp_path):
    samples = [Sample(str(make_image(tmp_path / f"{c}{i}.jpg", (30 + 40 * i, 90, 9), i, (64 + 8 * i, 48))), c)
               for c in "ab" for i in range(3)]
    return samples, open_store(samples, PRE.resize_size, tmp_path / "cache")


@pytest.fixture
def roomy_meta(monkeypatch):
    """The meta device with as much free memory as anything here needs."""
    monkeypatch.setitem(hardware.FREE_MEMORY, "meta", lambda device: 1 << 40)


def image_bytes(store, samples) -> int:
    return sum(int(store.index[store.slot(s)]["height"]) * int(store.index[store.slot(s)]["width"]) * 3
               for s in samples)


# Item 1: MPS has no float64.
@pytest.mark.parametrize("resident", [False, True])
def test_no_float64_tensor_is_made_on_the_device(data, monkeypatch, resident):
    samples, store = data
    if resident:
        monkeypatch.setitem(hardware.FREE_MEMORY, "meta", lambda device: 1 << 40)
    batches = ImageSource(store).batches(samples, CLASSES, PRE, 4, True, 0, on("meta"))
    with Recorder() as seen:
        for _ in range(2):
            assert [images.device.type for images, _ in batches] == ["meta", "meta"]
    on_device = {c["dtype"] for c in seen.calls if c["device"] == "meta"}
    assert on_device and torch.float64 not in on_device, on_device


# Item 7: shared GPUs.
def test_residency_is_budgeted_from_free_memory_not_the_total(data, monkeypatch):
    samples, store = data
    total, free = 80 << 30, 4 * store.nbytes - 4  # a quarter of what is free: one byte short of the store
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: type("P", (), {"total_memory": total}))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    images = ImageSource(store).device_images(torch.device("cuda"))
    assert not images.resident  # streamed: this machine has no CUDA to upload to


def test_a_mac_keeps_images_in_a_share_of_the_memory_metal_recommends(monkeypatch):
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 16 << 30)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 8 << 30)
    assert residency_budget(torch.device("mps")) == 2 << 30
    assert residency_budget(torch.device("cpu")) == 0


def test_an_upload_that_runs_out_of_device_memory_streams_instead(data, roomy_meta, capfd):
    samples, store = data
    with OutOfDeviceMemory(limit=store.nbytes - 1):  # room for a batch, not for every image at once
        assert not DeviceImages(store, torch.device("meta"), budget_bytes=1 << 40).resident
        batches = ImageSource(store).batches(samples, CLASSES, PRE, 2, True, 0, on("meta"))
        assert [len(images) for images, _ in batches] == [2, 2, 2]
    assert "out of memory" in capfd.readouterr().err


# Item 9: no host synchronisation per batch.
@pytest.mark.parametrize("resident", [False, True])
def test_device_batches_are_sent_from_pinned_memory_without_waiting(data, monkeypatch, resident):
    samples, store = data
    if resident:
        monkeypatch.setitem(hardware.FREE_MEMORY, "meta", lambda device: 1 << 40)
    pinned = set()

    def pin(tensor, *args, **kwargs):  # this machine cannot pin: a copy that remembers its address
        copy = tensor.clone()
        pinned.add(copy.data_ptr())
        return copy
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    batches = ImageSource(store).batches(samples, CLASSES, PRE, 4, True, 0, on("meta", pin_memory=True))
    with Recorder() as seen:
        for images, targets in batches:
            assert images.device.type == targets.device.type == "meta"
    uploads = seen.uploads()
    assert uploads and all(c["non_blocking"] and c["address"] in pinned for c in uploads), uploads


# Item 10: large datasets on a GPU.
def test_only_the_images_of_the_split_asked_for_are_uploaded(data, roomy_meta):
    samples, store = data
    test = samples[:2]
    with Recorder() as seen:
        batches = ImageSource(store).batches(test, CLASSES, PRE, 2, False, 0, on("meta"))
    assert max(c["bytes"] for c in seen.calls if c["device"] == "meta") == image_bytes(store, test) < store.nbytes
    assert [len(images) for images, _ in batches] == [2]


def test_streamed_batches_are_gathered_ahead_on_another_thread(data, monkeypatch):
    samples, store = data
    events, read = [], store.image

    def reading(slot, source):
        events.append(("read", threading.current_thread() is threading.main_thread()))
        return read(slot, source)
    monkeypatch.setattr(store, "image", reading)
    batches = iter(ImageSource(store).batches(samples, CLASSES, PRE, 2, True, 0, on("meta")))
    next(batches)
    time.sleep(0.5)  # the GPU computing on the first batch
    events.append(("asked for the second batch", None))
    next(batches)
    asked = events.index(("asked for the second batch", None))
    assert sum(1 for e in events[:asked] if e[0] == "read") == 4  # the first two images, and the next two
    assert not any(on_main for what, on_main in events if what == "read")


# Item 11: augmentation batched.
@pytest.mark.parametrize("train", [True, False])
def test_a_batch_costs_the_same_operations_whatever_its_size(data, train):
    samples, store = data
    counts = []
    for size in (2, 6):
        batches = ImageSource(store).batches(samples, CLASSES, PRE, size, train, 0, on("meta"))
        with Recorder() as seen:
            next(iter(batches))
        counts.append(len([c for c in seen.calls if c["device"] == "meta"]))  # kernels the device runs
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("channels_last", [False, True])
def test_device_batches_come_in_the_layout_the_model_runs_in(data, channels_last):
    samples, store = data
    hw = on("meta", channels_last=channels_last)
    images, _ = next(iter(ImageSource(store).batches(samples, CLASSES, PRE, 4, True, 0, hw)))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert images.is_contiguous(memory_format=layout) and images.dtype == torch.float32
    assert hw.to_device(images) is images  # no copy per step to change the layout


# Item 12: inference at a size of its own, embeddings copied to the host in chunks.
def test_embeddings_come_to_the_host_a_chunk_at_a_time_not_batch_by_batch():
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6, device="cuda"), nn.Linear(6, 2, device="cuda"))
        loader = [(torch.randn(4, 3, 2, 2, device="cuda"), torch.zeros(4, dtype=torch.long, device="cuda"))
                  for _ in range(5)]
        with Recorder() as seen:
            chunks = list(embed(model, model[2], loader, on("cuda", pin_memory=True)))
        assert sum(len(targets) for _, targets in chunks) == 20
        assert all(e.device.type == t.device.type == "cpu" and e.shape[1] == 6 for e, t in chunks)
    assert len(seen.downloads()) == 2 * len(chunks) <= 2, seen.downloads()  # embeddings and targets, once each


# Item 13: the measurement.
def test_a_timed_step_makes_no_input_and_copies_nothing():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    work = Workload(model, crop_size=4, train_images=16, infer_images=8, train_batch=8, infer_batch=8)
    one_round, _ = _warm_up(on("meta"), {"precision": "fp32", "channels_last": False}, work, model)
    with Recorder() as seen:
        assert one_round() > 0
    made = {c["op"] for c in seen.calls}
    assert not seen.uploads() and not made & {"aten.randn.default", "aten.normal_.default"}, made


# Item 15: MPS measures nothing.
def test_a_timed_step_waits_for_the_device_it_ran_on(monkeypatch):
    waits = []
    monkeypatch.setitem(hardware.SYNCHRONIZE, "meta", lambda: waits.append("meta"))
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2)).to("meta")
    step = _stepper(model, on("meta"))
    step(4, True, 2)
    step(4, False, 2)
    assert waits == ["meta", "meta"]
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waits.append("mps"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waits.append("cuda"))
    hardware.SYNCHRONIZE["mps"]()
    hardware.SYNCHRONIZE["cuda"]()
    assert waits[2:] == ["mps", "cuda"]


# Item 16: the GPU benchmark compares like with like.
def test_the_gpu_benchmark_runs_the_tutorials_recipe_with_cudnn_autotuning_as_ours(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the benchmark puts its folder first
    gpu = runpy.run_path(str(ROOT / "benchmarks" / "gpu.py"))
    script = tmp_path / "recipe.py"
    script.write_text("import sys, torch\nprint(torch.backends.cudnn.benchmark, sys.argv[1:])\n")
    out = subprocess.run(gpu["baseline_command"](script, "--mode", "extract"), capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "True ['--mode', 'extract']"
    assert sys.executable in gpu["baseline_command"](script)
