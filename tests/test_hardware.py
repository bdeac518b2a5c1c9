"""hardware.py: `auto` decided by measurement, and decided alike when measured again."""
import json

import pytest
from torch import nn

from transferlab.hardware import (
    MIN_MARGIN,
    MIN_ROUNDS,
    Workload,
    _warm_up,
    choose,
    decide,
    pick_fastest,
    pick_hardware,
    run_rounds,
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
    step = _warm_up(pick_hardware("cpu", "fp32", False, 0), {"precision": "fp32", "channels_last": False},
                    work, model, 60.0)
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
