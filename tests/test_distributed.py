"""Data-parallel training (train.processes): two processes against one, and through DVC."""
import ast
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from conftest import CLASS_COLORS, copy_finished, make_image, run
from torch import nn

from transferlab import distributed
from transferlab.data import ImageSource
from transferlab.distributed import SINGLE, World, spawn
from transferlab.engine import fit, make_optimizer, seed_everything
from transferlab.errors import UserError
from transferlab.features import feature_loaders
from transferlab.hardware import pick_hardware
from transferlab.images import Sample
from transferlab.models import Preprocess, build_model
from transferlab.stages.train import check_batch_size
from transferlab.store import open_store

PRE = Preprocess(crop_size=24, resize_size=28, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
CLASSES = list(CLASS_COLORS)
# 11 training images: batches of 5, 5 and 1, shared 2+3, 2+3 and 0+1 by two processes; 6 val
# images: 5 and 1. The empty shares are the hard case: every process must still step.
BATCH = 5


@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 8])
def test_the_shares_of_a_batch_cover_it_once(n, size):
    rows = [i for rank in range(size) for i in range(n)[World(rank, size).shard(n)]]
    assert rows == list(range(n))


# What distributed.py calls on torch.distributed that is no collective: the group's own lifecycle.
NOT_COLLECTIVES = {"init_process_group", "destroy_process_group", "is_initialized"}


def collectives_called() -> set[str]:
    """Every `dist.NAME(...)` that distributed.py calls, less the group's lifecycle: read from its
    source, so that a collective added there is one this test must record."""
    tree = ast.parse(Path(distributed.__file__).read_text())
    return {node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "dist"} - NOT_COLLECTIVES


def backend_chosen(monkeypatch, device: str) -> str:
    """The backend that distributed._init hands torch for a run on `device` (no group is made)."""
    chosen = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: chosen.append(backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    distributed._init(World(0, 2, 0, 2), "env://", device)
    return chosen[0]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_collective_runs_on_a_backend_that_moves_its_tensors(monkeypatch, device):
    """Each collective World calls, and DDP's gradient all-reduce, records the devices of the tensors
    it hands torch.distributed; each must be one that torch says the run's backend serves (nccl
    alone would fail on the epoch's CPU statistics). On a CUDA run the loss count and the model
    are on the GPU: fake tensors stand for them where there is none."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    backend = backend_chosen(monkeypatch, device)
    served = set(dist.BackendConfig(backend).get_device_backend_map())
    calls = []

    def recorder(name):
        def record(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            calls.append((name, {t.device.type for t in tensors}))
        return record
    for name in collectives_called():
        monkeypatch.setattr(dist, name, recorder(name))
    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", lambda module, device_ids: calls.append(
        ("DistributedDataParallel", {p.device.type for p in module.parameters()})))
    world, here = World(rank=0, size=2), torch.device(device, 0) if device == "cuda" else torch.device("cpu")
    world.sum([1.0, 2.0])  # the epoch's statistics: on the CPU whatever the device
    world.broadcast({"seed": 1})
    world.gather({"rows": 3})
    world.barrier()
    with FakeTensorMode() if device == "cuda" else contextlib.nullcontext():
        world.mean_scale(3, here)
        world.wrap(nn.Linear(2, 2, device=here), here)
    assert {name for name, _ in calls} == collectives_called() | {"DistributedDataParallel"}
    assert {"cpu", device} <= set().union(*(devices for _, devices in calls))
    for name, devices in calls:
        assert devices <= served, f"{name} hands {devices} tensors to {backend}, which serves {served}"


def tiny_net() -> nn.Module:  # no BatchNorm: its statistics are each process's own, by design
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


def train_and_embed(world: World, train: list[Sample], val: list[Sample], root: Path, out: Path) -> None:
    """Three epochs of tiny_net on tensor batches, then an embedding cache of resnet18 (2 views);
    rank 0 saves what came out."""
    hw = replace(pick_hardware("cpu", "fp32", False, 0), tensor_batches=True)
    source = ImageSource(open_store(train + val, PRE.resize_size, root / "store"))
    seed_everything(0)
    train_loader = source.batches(train, CLASSES, PRE, BATCH, True, 0, hw, world=world)
    val_loader = source.batches(val, CLASSES, PRE, BATCH, False, 0, hw, world=world)
    model = tiny_net()
    optimizer = make_optimizer(list(model.parameters()), "sgd", 0.05, 0.9, 0.0)
    result = fit(model, train_loader, val_loader, optimizer, None, 3, hw, world=world)
    built = build_model("resnet", 2, pretrained=False, freeze="all")
    big = replace(PRE, crop_size=64, resize_size=72)
    images = ImageSource(open_store(train + val, big.resize_size, root / "store"))

    def image_batches(samples, training):
        return images.batches(samples, CLASSES, big, BATCH, training, 0, hw, world=world, shuffle=False)
    _, features, _ = feature_loaders(built, train, val, BATCH, 2, hw, 0, out.parent / "cache", image_batches, world)
    if world.main:
        torch.save({"steps": len(train_loader), "history": result.history, "state": model.state_dict(),
                    "embeddings": features.dataset.tensors}, out)


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    def samples(split, n):
        return [Sample(str(make_image(root / split / f"{c}{i}.png", color, seed=hash((split, c, i)) % 999,
                                      size=(80, 72))), c)
                for c, color in CLASS_COLORS.items() for i in range(n)]
    train, val = samples("train", 6)[:-1], samples("val", 3)
    results = []
    for processes in (1, 2):
        out = root / f"{processes}" / "result.pt"
        out.parent.mkdir()
        job = partial(train_and_embed, train=train, val=val, root=root, out=out)
        job(SINGLE) if processes == 1 else spawn(job, processes, "cpu", "test")
        results.append(torch.load(out))
    return results


@pytest.mark.integration
def test_two_processes_take_the_steps_of_one_and_end_with_its_weights(one_and_two):
    one, two = one_and_two
    assert one["steps"] == two["steps"] == 3  # batch_size is the global batch
    for a, b in zip(one["history"], two["history"]):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    for name, weights in one["state"].items():  # the same images, crops and steps: float rounding apart
        assert torch.allclose(weights, two["state"][name], atol=1e-5), name


@pytest.mark.integration
def test_two_processes_embed_the_images_one_does_in_the_same_order(one_and_two):
    one, two = one_and_two
    (x1, y1), (x2, y2) = one["embeddings"], two["embeddings"]
    assert x1.shape == x2.shape == (2 * 11, 512)
    assert torch.equal(y1, y2)
    assert torch.allclose(x1, x2, atol=1e-4)
    assert not torch.allclose(x1[:11].sort(0).values, x1[11:].sort(0).values)  # two views: two draws


def rank_processes(pid: int) -> list[int]:
    """The training processes that a stage started (spawned Python processes below `pid`)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append((int(stat.parent.name), cmdline))
    found, stack = [], [pid]
    while stack:
        for child, cmdline in children.get(stack.pop(), []):
            stack.append(child)
            if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
                found.append(child)
    return found


@pytest.fixture(scope="module")
def project(finished_project, tmp_path_factory):
    """The session's finished project (one process, batch 4, 2 epochs), copied: these tests change it."""
    return copy_finished(finished_project, tmp_path_factory.mktemp("dp") / "project")


@pytest.mark.integration
def test_processes_2_through_dvc_exp_run_a_killed_process_stops_it_and_it_resumes(project):
    """The README's `dvc exp run -S train.processes=2`, with finetune given 4 epochs: one of its
    processes killed in its second epoch stops the run, keeping finetune's outputs; the same command
    again resumes after epoch 1, and every mode ends trained by two processes."""
    project, env = project
    one = {mode: json.loads((project / f"reports/train/{mode}.json").read_text()) for mode in ("finetune", "extract")}
    finetune_outputs = ["models/finetune.pt", "metrics/train/finetune.json", "reports/train/finetune.json"]
    good = {path: (project / path).read_bytes() for path in finetune_outputs}
    command = ["dvc", "exp", "run", "-S", "train.processes=2", "-S", "finetune.epochs=4"]
    process = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    for line in process.stdout:
        if line.startswith("epoch 1/4"):  # finetune's state after epoch 1 is saved; epoch 2 is under way
            os.kill(rank_processes(process.pid)[-1], signal.SIGKILL)
            break
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    assert re.search(r"process [01] of 2 was killed by SIGKILL; stopped the others", stderr), stderr
    assert "unchanged, as the last finished run left them: models/finetune.pt" in stderr
    assert {path: (project / path).read_bytes() for path in finetune_outputs} == good
    assert not rank_processes(os.getpid())

    again = run(command, project, env)
    assert "resuming after epoch 1" in again.stdout and "finetune: 2 processes" in again.stdout
    for mode in ("finetune", "extract", "scratch"):
        assert json.loads((project / f"metrics/train/{mode}.json").read_text())["world_size"] == 2
    for mode, report in one.items():
        two = json.loads((project / f"reports/train/{mode}.json").read_text())
        assert two["optimizer_steps_per_epoch"] == report["optimizer_steps_per_epoch"] > 1
        if mode == "extract":  # the head on the same cached embeddings, on the same batches: the same run
            assert two["best_val_loss"] == pytest.approx(report["best_val_loss"], rel=1e-4)
    assert sorted(p.name for p in (project / "models").iterdir()) == [
        ".gitignore", "extract.pt", "finetune.pt", "scratch.pt"]  # one set of outputs
    assert not list((project / "data/cache/resume").glob("*"))
    assert "train.processes" in run(["dvc", "exp", "show", "--csv"], project, env).stdout


@pytest.mark.integration
def test_the_stage_runs_under_torchrun_as_on_two_machines(project):
    """The README's multi-machine command, both "machines" here: two torchrun agents meeting at
    one rendezvous endpoint, one process each."""
    project, env = project
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["processes"] = 1  # torchrun decides the number of processes
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    command = ["torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
               f"127.0.0.1:{port}", "-m", "transferlab.stages.train", "finetune"]
    nodes = [subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
    assert sum("finetune: best val accuracy" in out for out in outputs) == 1  # rank 0 alone reports and writes
    report = json.loads((project / "reports/train/finetune.json").read_text())
    assert report["world_size"] == 2 and report["optimizer_steps_per_epoch"] > 1
    run(["dvc", "commit", "-f", "train-finetune"], project, env)
    assert "train-finetune" not in run(["dvc", "status", "train-finetune"], project, env).stdout


@pytest.mark.integration
def test_a_failing_process_stops_the_others_with_one_clear_error(capfd):
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"test: process 1 of 2 failed with exit code 1 \(its message is above\)"):
        spawn(failing, 2, "cpu", "test")
    assert time.perf_counter() - start < 50  # rank 0 was stopped, not waited for
    assert "process 1: error: rank 1 cannot go on" in capfd.readouterr().err


def failing(world: World) -> None:
    if world.rank == 1:
        raise UserError("rank 1 cannot go on")
    time.sleep(60)


def test_a_batch_smaller_than_the_number_of_processes_is_refused():
    with pytest.raises(UserError, match="train.batch_size is 1, fewer images than the 2 training processes"):
        check_batch_size(1, 2)
    check_batch_size(2, 2)
