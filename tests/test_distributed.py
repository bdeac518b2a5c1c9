"""Data-parallel training (train.processes): two processes against one, and through DVC."""
import ast
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import yaml
from conftest import CLASS_COLORS, copy_finished, make_image, run
from torch import nn

from transferlab import distributed
from transferlab.data import ImageDataset, ImageSource, ShareOfBatches, build_transform, make_loader
from transferlab.distributed import SINGLE, World, claim_gpu, spawn, use_least_used_gpu, whole_batch_sizes
from transferlab.engine import fit, make_optimizer, seed_everything, train_one_epoch
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
    assert [World(rank, size).share_size(n) for rank in range(size)] == [
        len(range(n)[World(rank, size).shard(n)]) for rank in range(size)]


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
    alone would fail on the epoch's CPU statistics). On a CUDA run the BatchNorm buffers and the
    model are on the GPU: fake tensors stand for them where there is none."""
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
        world.sync_buffers(nn.BatchNorm1d(2, device=here))  # BatchNorm's statistics, on the device
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
    """docs/sharing.md's `dvc exp run -S train.processes=2`, with finetune given 4 epochs: one of its
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
    """docs/sharing.md's multi-machine command, both "machines" here: two torchrun agents meeting at
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


def bn_net() -> nn.Module:  # trained BatchNorm: what makes several processes differ from one
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 2))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """11 training and 6 val images (batches of 5: 5, 5, 1), and their store."""
    root = tmp_path_factory.mktemp("images")
    def samples(split, n):
        return [Sample(str(make_image(root / split / f"{c}{i}.png", color, seed=i + 10 * len(split))), c)
                for c, color in CLASS_COLORS.items() for i in range(n)]
    train, val = samples("train", 6)[:-1], samples("val", 3)
    return train, val, open_store(train + val, PRE.resize_size, root / "store")


def test_every_process_knows_the_whole_batches_it_has_a_share_of(images):
    """The loss scale comes from the whole batch's size, which each process works out from its
    loader (no collective per step): it must be the size of the batch each share is cut from."""
    train, _, store = images
    world = World(rank=1, size=2)
    hw = replace(pick_hardware("cpu", "fp32", False, 0, False, False), tensor_batches=True)
    dataset = ImageDataset(train, CLASSES, build_transform(PRE, True), store)
    loaders = [make_loader(dataset, BATCH, True, 0, world=world),
               ImageSource(store).batches(train, CLASSES, PRE, BATCH, True, 0, hw, world=world),
               torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(11, 2), torch.zeros(11)),
                                           batch_sampler=ShareOfBatches(torch.utils.data.BatchSampler(
                                               range(11), BATCH, False), world))]  # the feature cache's
    for loader in loaders:
        assert whole_batch_sizes(loader) == [5, 5, 1]
        assert [len(targets) for _, targets in loader] == [world.share_size(n) for n in [5, 5, 1]] == [3, 3, 1]


def test_a_training_step_of_several_processes_has_no_collective_of_its_own(images, monkeypatch):
    """DDP's gradient all-reduce apart, a step calls no collective (the whole batch's size is known
    to every process): the epoch's statistics are summed once, at its end."""
    train, _, store = images
    calls = []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *args, **kwargs: calls.append(tensor.tolist()))
    world = World(rank=0, size=2)
    loader = make_loader(ImageDataset(train, CLASSES, build_transform(PRE, True), store), BATCH, True, 0, world=world)
    model = tiny_net()
    hw = pick_hardware("cpu", "fp32", False, 0, False, False)
    stats = train_one_epoch(model, loader, make_optimizer(list(model.parameters()), "sgd", 0.05, 0.9, 0.0), hw,
                            hw.grad_scaler(), world=world)
    assert len(calls) == 1 and calls[0][2] == stats.images == 2 + 2 + 0  # rank 0's shares: the sum is faked
    assert world.mean_scale(5) == 2 / 5


def test_batchnorm_is_synchronised_on_cuda_and_said_not_to_be_on_a_cpu(monkeypatch, capfd):
    """With several processes on CUDA every BatchNorm layer becomes a SyncBatchNorm (normalising
    over the whole batch, as one process does) with the same parameters and buffers; gloo has no
    SyncBatchNorm: a warning says so, and a share of one image is refused."""
    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", lambda module, device_ids: module)
    world, model = World(rank=0, size=2), bn_net()
    tensors = {id(t) for t in [*model.parameters(), *model.buffers()]}
    wrapped = world.wrap(model, torch.device("cuda", 0))
    assert wrapped is model and {type(m) for m in model.modules()} & {nn.BatchNorm2d, nn.SyncBatchNorm} == {
        nn.SyncBatchNorm}
    assert {id(t) for t in [*model.parameters(), *model.buffers()]} == tensors  # what the optimizer holds
    world.check_batchnorm(model, torch.device("cuda", 0), 2)  # synchronised: nothing to say
    assert capfd.readouterr().err == ""

    on_cpu = bn_net()
    world.wrap(on_cpu, torch.device("cpu"))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in on_cpu.modules())
    world.check_batchnorm(on_cpu, torch.device("cpu"), 5)
    assert "each BatchNorm layer normalises over its process's share of every batch (2 of 5 images)" in \
        capfd.readouterr().err
    with pytest.raises(UserError, match="1 image per process per batch.*Raise batch_size to 4 or more"):
        world.check_batchnorm(on_cpu, torch.device("cpu"), 3)
    on_cpu[1].requires_grad_(False)  # frozen: it keeps its statistics, and normalises alike everywhere
    world.check_batchnorm(on_cpu, torch.device("cpu"), 3)
    World(rank=1, size=2).check_batchnorm(bn_net(), torch.device("cpu"), 5)  # rank 0 alone warns
    assert capfd.readouterr().err == ""


def batchnorm_buffers(world: World, train: list[Sample], val: list[Sample], store_dir: Path, out: Path) -> None:
    """One epoch of bn_net; each process saves the BatchNorm statistics it scored val with."""
    hw = replace(pick_hardware("cpu", "fp32", False, 0), tensor_batches=True)
    source = ImageSource(open_store(train + val, PRE.resize_size, store_dir))
    seed_everything(0)
    model = bn_net()
    scored = []
    model[1].register_forward_pre_hook(lambda module, args: scored.append(
        [module.running_mean.clone(), module.running_var.clone()]) if not module.training else None)
    fit(model, source.batches(train, CLASSES, PRE, BATCH, True, 0, hw, world=world),
        source.batches(val, CLASSES, PRE, BATCH, False, 0, hw, world=world),
        make_optimizer(list(model.parameters()), "sgd", 0.05, 0.9, 0.0), None, 1, hw, world=world)
    torch.save(scored, out / f"rank{world.rank}.pt")


@pytest.mark.integration
def test_every_process_scores_val_with_rank_0s_batchnorm_statistics(images, tmp_path):
    """After an epoch's last step each process's running statistics are its own share's; val
    (and the best epoch) must be scored with rank 0's, the model that rank 0 keeps."""
    train, val, store = images
    spawn(partial(batchnorm_buffers, train=train, val=val, store_dir=store.folder.parent, out=tmp_path), 2, "cpu",
          "test")
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert (len(first), len(second)) == (1, 2)  # val's batches of 5 and 1, shared 2+3 and 0+1
    for mean, var in second:
        assert torch.equal(mean, first[0][0]) and torch.equal(var, first[0][1])


def release_claims() -> None:
    while distributed._claimed:
        distributed._claimed.pop().release()


def test_runs_of_one_process_spread_over_the_gpus(tmp_path):
    """`dvc queue start -j 2` on a 2-GPU machine: each stage process takes the GPU with the fewest
    transferlab processes on it (a lock file per GPU and place), the first among equals; the
    place is free again once its process ends."""
    gpus = ["GPU-4f2a", "GPU-9c1e"]
    try:
        assert [claim_gpu(gpus, tmp_path) for _ in range(5)] == [0, 1, 0, 1, 0]
        distributed._claimed[1].release()  # the experiment on GPU 1 finished
        assert claim_gpu(gpus, tmp_path) == 1
    finally:
        release_claims()
    other = subprocess.Popen([sys.executable, "-c", "import sys; from transferlab.distributed import claim_gpu; "
                              f"print(claim_gpu({gpus!r}, {str(tmp_path)!r}), flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "0"
        assert claim_gpu(gpus, tmp_path) == 1  # another process holds GPU 0
    finally:
        other.communicate("")
        release_claims()
    assert claim_gpu(gpus, tmp_path) == 0  # it ended: its lock went with it
    release_claims()


def test_a_run_of_one_process_uses_the_gpu_it_claimed(tmp_path, monkeypatch):
    """Faked: three visible GPUs here. CUDA_VISIBLE_DEVICES is torch's: these are the visible ones."""
    current = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=f"GPU-{i}"))
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    try:
        assert [use_least_used_gpu("auto", tmp_path) for _ in range(4)] == [0, 1, 2, 0] == current
        assert use_least_used_gpu("cpu", tmp_path) == 0 and len(current) == 4
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        assert use_least_used_gpu("cuda", tmp_path) == 0 and len(current) == 4  # one GPU: nothing to choose
    finally:
        release_claims()
