"""hardware.py: `auto` decided by measurement, and decided alike when measured again."""
import json
import time

import pytest
import torch
from torch import nn
from torch.utils.data import BatchSampler

from transferlab.data import ShareOfBatches
from transferlab.distributed import World
from transferlab.errors import UserError
from transferlab.hardware import (
    MIN_MARGIN,
    MIN_ROUNDS,
    Hardware,
    Workload,
    _warm_up,
    candidate_settings,
    choose,
    decide,
    pick_fastest,
    pick_hardware,
    run_rounds,
    time_candidates,
    warm_up,
)


@pytest.mark.timing  # its verdict is read from timings: make test runs it alone
def test_candidates_that_cost_the_same_decide_the_simplest_every_time(tmp_path):
    """Layout and bf16 buy a linear probe on flat inputs nothing (they only add copies and casts),
    and two names for one and the same step cost exactly the same: twenty fresh decisions of each
    must keep the simplest, not follow the noise of millisecond-scale steps."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))
    work = Workload(model, crop_size=16, train_images=40, infer_images=16, train_batch=8, infer_batch=8)
    chosen = []
    for attempt in range(5):
        hw = decide(pick_hardware("cpu", "auto", "auto", 0), work, tmp_path / str(attempt), ["linear"])
        assert hw.decision["measured_now"] and hw.decision["margin"] >= MIN_MARGIN
        chosen.append(hw.decision["chosen"])
    assert chosen == ["fp32"] * 5, chosen
    step, _ = _warm_up(pick_hardware("cpu", "fp32", False, 0), {"precision": "fp32", "channels_last": False},
                       work, model)
    twins = [choose(run_rounds({"first": step, "second": step}), ["first", "second"]) for _ in range(20)]
    assert twins == ["first"] * 20, twins


class CarryOver:
    """Fake steppers of equal cost, except that `penalised` pays 20% more right after `culprit`
    ran (what a candidate can leave behind for the next: caches, freed memory)."""

    def __init__(self, names: list[str], penalised: str, culprit: str):
        self.calls, self.penalised, self.culprit = [], penalised, culprit
        self.steppers = {name: (lambda name=name: self.step(name)) for name in names}

    def step(self, name: str) -> float:
        cost = 1.2 if name == self.penalised and self.calls[-1:] == [self.culprit] else 1.0
        self.calls.append(name)
        return cost


def test_what_one_candidate_leaves_the_next_biases_no_decision():
    """A fixed rotation hands the same successor every round (fp32 always after bf16 +
    channels-last): a carry-over cost would then read as fp32 + channels-last being faster."""
    names = ["fp32", "fp32 + channels-last", "bf16", "bf16 + channels-last"]
    fake = CarryOver(names, penalised="fp32", culprit="bf16 + channels-last")
    samples = run_rounds(fake.steppers)
    assert choose(samples, names) == "fp32"
    predecessors = {fake.calls[i - 1] for i in range(1, len(fake.calls)) if fake.calls[i] == "fp32"}
    assert set(names[1:]) <= predecessors, predecessors  # every other candidate, in some round


def test_a_candidate_wins_only_when_most_rounds_show_it_faster_by_the_margin():
    rounds = MIN_ROUNDS
    assert choose({"fp32": [1.0] * rounds, "bf16": [0.8] * rounds}, ["fp32", "bf16"]) == "bf16"
    assert choose({"fp32": [1.0] * rounds, "bf16": [0.97] * rounds}, ["fp32", "bf16"]) == "fp32"  # within 5%
    # Faster in most rounds but not enough of them to be sure: 6 of 9.
    assert choose({"fp32": [1.0] * rounds, "bf16": [0.8] * 6 + [1.1] * 3}, ["fp32", "bf16"]) == "fp32"
    # A failed or dropped baseline: the next simplest is the one to beat.
    assert choose({"fp32": None, "bf16": [1.0] * rounds, "fp16": [0.99] * rounds}, ["fp32", "bf16", "fp16"]) == "bf16"
    # Two that both beat fp32 surely: the faster, unless the simpler is within the margin of it.
    both = {"fp32": [1.0] * rounds, "bf16": [0.6] * rounds, "bf16 + channels-last": [0.59] * rounds}
    assert choose(both, list(both)) == "bf16"


def test_a_decision_is_measured_once_then_read_back(tmp_path):
    work = Workload(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), 2, 8, 8, 4, 4)
    first = decide(pick_hardware("cpu", "auto", False, 0), work, tmp_path, ["x"]).decision
    again = decide(pick_hardware("cpu", "auto", False, 0), work, tmp_path, ["x"]).decision
    assert first["measured_now"] and not again["measured_now"]
    assert again["chosen"] == first["chosen"] and set(first["seconds_per_image"]["model"]) == {"fp32", "bf16"}
    saved = json.loads(open(first["cache"]).read())
    assert all(len(t) >= MIN_ROUNDS and min(t) > 0 for t in saved["samples"].values())


@pytest.mark.parametrize("margin, expected", [(0.05, "bf16"), (0.10, "fp32")])
def test_a_less_precise_candidate_must_win_by_more_than_the_margin(margin, expected):
    assert pick_fastest({"fp32": 1.0, "bf16": 0.93}, ["fp32", "bf16"], margin) == expected


def test_a_pinned_input_path_is_not_measured(tmp_path):
    work = Workload(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), 2, 8, 8, 4, 4)
    timed = []
    pinned = decide(pick_hardware("cpu", "fp32", False, 0, False, True), work, tmp_path, ["x"],
                    input_seconds=lambda tensor: timed.append(tensor) or 0.001)
    assert timed == [] and pinned.tensor_batches and pinned.decision == {}
    measured = decide(pick_hardware("cpu", "fp32", False, 0, False, "auto"), work, tmp_path, ["x"],
                      input_seconds=lambda tensor: timed.append(tensor) or (0.001 if tensor else 0.002))
    assert timed == [False, True] and measured.tensor_batches and measured.decision["input_path"] == "tensor batches"


class AutotunesFirst(nn.Module):
    """A linear probe whose bf16 candidate pays a second and more on its first call (as cuDNN's
    autotuning does on a GPU), then runs as fast as fp32."""

    def __init__(self):
        super().__init__()
        self.linear, self.tuned = nn.Linear(3 * 4 * 4, 2), False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled("cpu") and not self.tuned:
            time.sleep(1.2)
            self.tuned = True
        return self.linear(images.flatten(1))


def test_first_calls_that_autotune_do_not_drop_a_candidate_as_stalled():
    work = Workload(AutotunesFirst(), crop_size=4, train_images=8, infer_images=0, train_batch=8, infer_batch=8)
    candidates = candidate_settings(pick_hardware("cpu", "auto", False, 0), ["precision"])
    samples, dropped = time_candidates(pick_hardware("cpu", "auto", False, 0), candidates, work)
    assert samples["fp32"] and samples["bf16"] and not dropped, dropped


def test_a_candidate_much_slower_once_warm_is_dropped_with_the_reason():
    class Emulated(nn.Module):  # bf16 that the hardware only emulates: slow on every call
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3 * 4 * 4, 2)

        def forward(self, images):
            time.sleep(0.6 if torch.is_autocast_enabled("cpu") else 0.0)
            return self.linear(images.flatten(1))
    work = Workload(Emulated(), crop_size=4, train_images=8, infer_images=8, train_batch=8, infer_batch=8)
    hw = pick_hardware("cpu", "auto", False, 0)
    samples, dropped = time_candidates(hw, candidate_settings(hw, ["precision"]), work)
    assert samples["fp32"] and samples["bf16"] is None and "stalled" in dropped["bf16"], dropped


def test_bf16_is_a_candidate_only_where_the_gpu_has_bf16_kernels(monkeypatch):
    """A V100 or a T4 runs bf16 by emulation: slow kernels, not a candidate."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    cuda = Hardware(torch.device("cuda"), None, False, 0, pin_memory=True, keep_freed_memory=False)
    assert list(candidate_settings(cuda, ["precision"])) == ["fp32", "fp16"]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert list(candidate_settings(cuda, ["precision"])) == ["fp32", "bf16", "fp16"]


class NoDeterministicKernel(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("adaptive_avg_pool2d_backward_cuda does not have a deterministic implementation, but "
                           "you set 'torch.use_deterministic_algorithms(True)'\nmore lines")


def test_when_every_candidate_fails_the_message_says_why(tmp_path):
    work = Workload(NoDeterministicKernel(), crop_size=2, train_images=4, infer_images=0, train_batch=4, infer_batch=4)
    with pytest.raises(UserError, match=r"fp32: failed: RuntimeError: adaptive_avg_pool2d_backward_cuda does not "
                                        r"have a deterministic implementation.*bf16: failed.*train.deterministic"):
        decide(pick_hardware("cpu", "auto", False, 0), work, tmp_path, ["x"])
    with pytest.raises(UserError, match="fp32: failed: RuntimeError: adaptive"):  # read back from the cache
        decide(pick_hardware("cpu", "auto", False, 0), work, tmp_path, ["x"])


@pytest.mark.parametrize("images, batch, processes", [(100, 8, 3), (10, 4, 2), (7, 8, 2), (3, 8, 4)])
def test_each_process_warms_up_the_shares_of_the_batches_it_meets(images, batch, processes):
    """The shares World.shard gives, full batches and the tail, on every process (not only the
    one that measured): a first call of a share is no stall in the middle of an epoch."""
    seen = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 2))
    model.register_forward_hook(lambda module, inputs, output: seen.append((len(inputs[0]), module.training)))
    work = Workload(model, 2, train_images=images, infer_images=images, train_batch=batch, infer_batch=batch,
                    processes=processes)
    for rank in range(processes):
        world = World(rank, processes)
        met = {len(share) for share in ShareOfBatches(BatchSampler(range(images), batch, False), world)} - {0}
        assert {size for size, train in work.shapes(rank) if train} == met
        assert {size for size, train in work.shapes(rank) if not train} == met
        seen.clear()
        warm_up(Hardware(torch.device("meta"), None, False, 0, False, False), work, rank)
        assert sorted(seen) == sorted(work.shapes(rank))
    assert set(work.shapes()) == {shape for rank in range(processes) for shape in work.shapes(rank)}


def test_a_cpu_has_no_first_calls_to_pay_before_the_loop():
    seen = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    model.register_forward_hook(lambda *args: seen.append(1))
    warm_up(pick_hardware("cpu", "fp32", False, 0), Workload(model, 2, 8, 8, 4, 4), 0)
    assert seen == []
