"""Data-parallel training with torch.distributed: the processes of one training run, and what
they share.

`World` is the run's place among its processes. One process is a world of size 1 whose
collectives do nothing, so the loop has no distributed branches. With several, every process
sees the same global batches (the same shuffles and augmentation draws) and computes its own
contiguous share of each; DistributedDataParallel all-reduces the gradients, so one process and
two take the same optimizer steps on the same images. Rank 0 alone writes outputs.

The train stage starts its processes itself (`train.processes`), or is started by torchrun,
which sets RANK, WORLD_SIZE and the rendezvous in the environment (several machines).
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from transferlab.errors import UserError
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

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the processes."""
        if self.size == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def mean_scale(self, images_here: int, device: torch.device) -> float | torch.Tensor:
        """What turns this process's summed loss into its part of the whole batch's mean loss:
        DDP's gradient averaging divides by the number of processes, so that number over the
        batch's images, counted over all processes (in a world of one, no device tensor: no copy
        to a GPU per step)."""
        if self.size == 1:
            return 1.0 / images_here
        count = torch.tensor(float(images_here), device=device)
        dist.all_reduce(count)
        return self.size / count

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

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model whose backward all-reduces its gradients (itself, in a world of one)."""
        if self.size == 1:
            return model
        # Frozen BatchNorm layers keep ImageNet statistics on every rank; trained ones are
        # broadcast from rank 0 before each forward (DDP's default), as in most DDP recipes.
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


SINGLE = World()


def resolve_processes(processes: int | str, device: str) -> int:
    """train.processes as a number: `auto` is one per visible GPU, else 1."""
    if processes != "auto":
        return int(processes)
    gpus = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    return max(1, gpus)


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
