"""Data-parallel training with torch.distributed: the processes of one training run, and what
they share.

`World` is the run's place among its processes. One process is a world of size 1 whose
collectives do nothing, so the loop has no distributed branches. With several, every process
sees the same global batches (the same shuffles and augmentation draws) and computes its own
contiguous share of each; DistributedDataParallel all-reduces the gradients, so one process and
two take the same optimizer steps on the same images. Rank 0 alone writes outputs.

The train stage starts its processes itself (`train.processes`), or is started by torchrun,
which sets RANK, WORLD_SIZE and the rendezvous in the environment (several machines).

Trained BatchNorm layers are what keeps several processes from being one: each normalises over
the images it is given. On CUDA they become SyncBatchNorm, which normalises over every process's
share of the batch, as one process does; gloo (a CPU) has no SyncBatchNorm, so there each process
normalises over its own share (said once, in a warning and in the report). Either way every
process scores val with rank 0's running statistics.

A run of one process on a machine with several GPUs takes the one with the fewest transferlab
processes on it (`claim_gpu`), so that `dvc queue start -j N` spreads its experiments over them.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from filelock import FileLock, Timeout
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from transferlab.errors import UserError, warn
from transferlab.store import cpu_count


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0   # which of this machine's GPUs is this process's
    local_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This process's contiguous share of a batch of n rows (shares differ by one at most)."""
        return slice(n * self.rank // self.size, n * (self.rank + 1) // self.size)

    def share_size(self, n: int) -> int:
        """How many rows of a batch of n this process computes."""
        return n * (self.rank + 1) // self.size - n * self.rank // self.size

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the processes."""
        if self.size == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def mean_scale(self, whole_batch: int) -> float:
        """What turns this process's summed loss into its part of the whole batch's mean loss:
        DDP's gradient averaging divides by the number of processes, so that number over the
        whole batch's images (every process's share: `whole_batch_sizes`). A host float: no
        collective and no device tensor per step."""
        return self.size / whole_batch

    def broadcast(self, value):
        """Rank 0's `value`, on every process (any picklable object)."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list | None:
        """Every process's `value`, in rank order, on rank 0; None elsewhere."""
        if self.size == 1:
            return [value]
        values = [None] * self.size if self.main else None
        dist.gather_object(value, values, dst=0)
        return values

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def syncs_batchnorm(self, device: torch.device) -> bool:
        """Whether trained BatchNorm layers normalise over the whole batch here: with several
        processes only on CUDA (nccl); torch's SyncBatchNorm has no CPU (gloo) kernels."""
        return self.size == 1 or device.type == "cuda"

    def check_batchnorm(self, model: nn.Module, device: torch.device, whole_batch: int) -> None:
        """Refuse, or warn about (rank 0), trained BatchNorm layers that normalise over a share of
        each batch rather than all of it: several processes where SyncBatchNorm cannot run."""
        if self.syncs_batchnorm(device) or not trains_batchnorm(model):
            return
        share = whole_batch // self.size
        if share < 2:
            raise UserError(f"train.batch_size {whole_batch} over {self.size} processes on {device.type} is "
                            f"{share} image per process per batch, and this model's BatchNorm layers would "
                            f"normalise over that one image: SyncBatchNorm, which normalises over the whole "
                            f"batch, needs CUDA. Raise batch_size to {2 * self.size} or more, or set "
                            f"train.processes to 1")
        if self.main:
            warn(f"{self.size} processes on {device.type}: each BatchNorm layer normalises over its process's "
                 f"share of every batch ({share} of {whole_batch} images), not over the whole batch as one "
                 f"process does (SyncBatchNorm needs CUDA), so the results will differ from one process's")

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model whose backward all-reduces its gradients (itself, in a world of one). On CUDA
        its BatchNorm layers become SyncBatchNorm, in `model` itself (the same parameters and
        buffers, so the optimizer and state_dict are unchanged)."""
        if self.size == 1:
            return model
        if self.syncs_batchnorm(device):
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # Frozen BatchNorm layers keep ImageNet statistics on every rank; trained ones' buffers are
        # broadcast from rank 0 before each forward (DDP's default) and before val (sync_buffers).
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm's running statistics) on every process: after the last step
        of an epoch each process's differ (it updated them with its own share), and val must score
        the model rank 0 keeps."""
        if self.size == 1:
            return
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def trains_batchnorm(model: nn.Module) -> bool:
    """Whether any BatchNorm layer of `model` trains (a frozen one keeps its statistics: engine.set_train_mode)."""
    return any(isinstance(m, _BatchNorm) and any(p.requires_grad for p in m.parameters()) for m in model.modules())


def batchnorm_statistics(model: nn.Module, device: torch.device, world_size: int) -> str | None:
    """How trained BatchNorm layers normalised, for the train report (None: none trains)."""
    if not trains_batchnorm(model):
        return None
    if world_size == 1:
        return "over each batch"
    if World(size=world_size).syncs_batchnorm(device):
        return "over each whole batch (SyncBatchNorm)"
    return "over each process's share of a batch (no SyncBatchNorm without CUDA)"


def whole_batch_sizes(loader) -> list[int]:
    """How many images each batch of `loader` holds, every process's share together, in order:
    what every process knows without asking the others. For data.py's two kinds of loaders: a
    DataLoader over ShareOfBatches (or any BatchSampler) and TensorBatches."""
    batches = getattr(loader, "batch_sampler", None)
    batches = getattr(batches, "batches", batches)  # ShareOfBatches holds the whole batches' sampler
    if batches is not None and hasattr(batches, "sampler"):
        images, size, drop_last = len(batches.sampler), batches.batch_size, batches.drop_last
    elif hasattr(loader, "samples") and hasattr(loader, "batch_size"):
        images, size, drop_last = len(loader.samples), loader.batch_size, False
    else:
        raise TypeError(f"{type(loader).__name__}: not a loader whose whole batches are known")
    tail = 0 if drop_last else images % size
    return [size] * (images // size) + ([tail] if tail else [])


SINGLE = World()


def resolve_processes(processes: int | str, device: str) -> int:
    """train.processes as a number: `auto` is one per visible GPU, else 1."""
    if processes != "auto":
        return int(processes)
    gpus = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    return max(1, gpus)


# A process claims a GPU by holding a lock file per GPU and place in line, the first free one in
# the order: every GPU's first place (by index), then every GPU's second, ... At most this many.
GPU_PLACES = 64
_claimed: list[FileLock] = []  # held until this process exits, when the system releases them


def claim_gpu(gpu_ids: list[str], lock_dir: Path) -> int:
    """The index, among `gpu_ids` (the visible GPUs, by UUID: the same GPU has the same lock
    whatever CUDA_VISIBLE_DEVICES numbers it), of a GPU with the fewest transferlab processes on
    it, the lowest index among equals, claimed for this process's life (the system releases the
    lock when it exits, however): the stages of `dvc queue start -j N`, each a process, spread over
    the GPUs. (Fewest exactly while they end in the order they started; when an earlier one ends
    first, its place goes first.) Once every place is taken, GPU 0."""
    Path(lock_dir).mkdir(parents=True, exist_ok=True)
    for place in range(GPU_PLACES):
        for index, gpu in enumerate(gpu_ids):
            lock = FileLock(str(Path(lock_dir) / f"gpu-{re.sub(r'[^A-Za-z0-9-]', '_', gpu)}-{place}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            _claimed.append(lock)
            return index
    return 0


def use_least_used_gpu(device: str, lock_dir: Path) -> int:
    """Which GPU a run of one process uses: where `device` is CUDA and several are visible, the
    one `claim_gpu` picks, made the current device (so that what names no index goes there too);
    else 0."""
    gpus = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    if gpus < 2:
        return 0
    index = claim_gpu([str(torch.cuda.get_device_properties(i).uuid) for i in range(gpus)], lock_dir)
    torch.cuda.set_device(index)
    return index


def started_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def join(device: str) -> World:
    """Join the process group that torchrun's environment describes (backend_for says which backends)."""
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)),
                  int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))
    _init(world, "env://", device)
    return world


def _init(world: World, init_method: str, device: str) -> None:
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(world.local_rank)
    else:  # the processes share this machine's cores; more threads than cores only contend
        torch.set_num_threads(max(1, cpu_count() // world.local_size))
    dist.init_process_group(backend_for(cuda), init_method=init_method, rank=world.rank, world_size=world.size)


def backend_for(cuda: bool) -> str:
    """The process group's backend per device type. nccl moves CUDA tensors only, and some of our
    collectives carry small CPU tensors (the epoch's stats) or pickled objects, which torch sends
    as CPU tensors when gloo is among the backends: so on CUDA, gloo for CPU and nccl for CUDA."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def spawn(run_rank: Callable[[World], None], processes: int, device: str, what: str) -> None:
    """Run `run_rank(world)` in `processes` new processes on this machine and wait for all. If one
    fails or is killed, the others are stopped and a UserError says which and how; if this process
    is interrupted, they are stopped too."""
    rendezvous = tempfile.mkdtemp(prefix="transferlab-rendezvous-")
    context = mp.start_processes(_rank_main, args=(run_rank, processes, device, f"file://{rendezvous}/store"),
                                 nprocs=processes, join=False, start_method="spawn")
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as err:
        raise UserError(f"{what}: process {err.error_index} of {processes} {_how(err.exit_code)}; stopped the "
                        f"others") from None
    except mp.ProcessRaisedException as err:
        print(err, file=sys.stderr)
        raise UserError(f"{what}: process {err.error_index} of {processes} failed (its traceback is above); "
                        f"stopped the others") from None
    finally:
        for process in context.processes:  # on an interruption, join() has not stopped them
            if process.is_alive():
                process.terminate()
            process.join()
        shutil.rmtree(rendezvous, ignore_errors=True)


def _how(exit_code: int) -> str:
    if exit_code < 0:
        return f"was killed by {signal.Signals(-exit_code).name}"
    return f"failed with exit code {exit_code}" + (" (its message is above)" if exit_code == 1 else "")


def _rank_main(rank: int, run_rank: Callable[[World], None], size: int, device: str, init_method: str) -> None:
    """One spawned process: join the group, run, leave. A failure prints its message and exits 1,
    which `spawn` turns into one clear error for the whole run."""
    world = World(rank, size, rank, size)
    try:
        _init(world, init_method, device)
        run_rank(world)
    except UserError as err:
        print(f"process {rank}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:  # not a success: torch's wrapper would exit 0
        sys.exit(130)
    finally:
        leave()
