"""hardware.py: `auto` decided by measurement, and decided alike when measured again."""
import json

import pytest
from torch import nn

from transferlab.hardware import MIN_MARGIN, Workload, decide, pick_fastest, pick_hardware


@pytest.mark.timing  # its verdict is read from timings: make test runs it alone
def test_candidates_that_cost_the_same_decide_the_simplest_every_time(tmp_path):
    """Layout and bf16 buy a linear probe on flat inputs nothing (they only add copies and casts):
    five fresh measurements must all keep fp32 in the plain layout, not follow the noise."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))
    work = Workload(model, crop_size=16, train_images=40, infer_images=16, train_batch=8, infer_batch=8)
    chosen = []
    for attempt in range(5):
        hw = decide(pick_hardware("cpu", "auto", "auto", 0), work, tmp_path / str(attempt), ["linear"])
        decision = hw.decision
        assert decision["measured_now"] and decision["margin"] >= MIN_MARGIN
        chosen.append(decision["chosen"])
    assert chosen == ["fp32"] * 5, chosen


def test_a_decision_is_measured_once_then_read_back(tmp_path):
    work = Workload(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), 2, 8, 8, 4, 4)
    first = decide(pick_hardware("cpu", "auto", False, 0), work, tmp_path, ["x"]).decision
    again = decide(pick_hardware("cpu", "auto", False, 0), work, tmp_path, ["x"]).decision
    assert first["measured_now"] and not again["measured_now"]
    assert again["chosen"] == first["chosen"] and set(first["seconds_per_image"]["model"]) == {"fp32", "bf16"}
    saved = json.loads(open(first["cache"]).read())
    assert saved["noise"] >= 0 and all(t > 0 for t in saved["model"].values())


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
