"""The leaderboard's statistics on constructed predictions: pooling seeds, the paired test, verdicts."""
import numpy as np
import pytest

from transferlab.compare import ModeResult, Run, head_to_head, leaderboard, markdown, paired_p, pareto_front
from transferlab.errors import UserError

IMAGES = [(f"data/raw/val/c/{i}.jpg", "ants" if i % 2 else "bees") for i in range(60)]


def run(label, model, seed, right_by_mode, images=IMAGES, seconds=10.0, **params):
    modes = {mode: ModeResult(np.asarray(right, dtype=bool), seconds, 1000, 50.0) for mode, right in right_by_mode.items()}
    return Run(label, label, {"model": model, "seed": seed, **params}, list(images), modes)


def test_right_on_every_image_beats_right_on_half_with_a_small_p():
    perfect, half = np.ones(60), np.arange(60) % 2
    rows = leaderboard([run("a", "lite0", 1, {"finetune": perfect}), run("b", "lite1", 1, {"finetune": half})])
    assert [r["model"] for r in rows] == ["lite0", "lite1"] and rows[0]["best"] and rows[0]["verdict"] == "best"
    assert rows[1]["verdict"] == "worse" and rows[1]["p_value"] < 1e-3
    assert paired_p(perfect[None], half[None], np.random.default_rng(0)) < 1e-3


def test_identical_predictions_are_not_distinguishable():
    same = np.arange(60) % 3 > 0
    rows = leaderboard([run("a", "lite0", 1, {"extract": same}), run("b", "lite1", 1, {"extract": same})])
    assert rows[1]["verdict"] == "not distinguishable" and rows[1]["p_value"] == 1.0


def test_seeds_pool_into_one_row_per_model_mode_and_differing_param():
    rng = np.random.default_rng(0)
    runs = [run(f"{m}-{s}-{lr}", m, s, {"finetune": rng.random(60) < acc, "scratch": rng.random(60) < 0.5}, lr=lr)
            for m, acc in (("lite0", 0.9), ("lite1", 0.8)) for s in (1, 2, 3) for lr in (0.01,)]
    runs += [run(f"lite0-{s}-0.1", "lite0", s, {"finetune": rng.random(60) < 0.6, "scratch": rng.random(60) < 0.5},
                 lr=0.1) for s in (1, 2)]
    rows = leaderboard(runs)
    keys = {(r["model"], r["mode"], tuple(r["params"].items())): r["seeds"] for r in rows}
    assert keys == {("lite0", "finetune", (("lr", 0.01),)): 3, ("lite1", "finetune", (("lr", 0.01),)): 3,
                    ("lite0", "finetune", (("lr", 0.1),)): 2, ("lite0", "scratch", (("lr", 0.01),)): 3,
                    ("lite1", "scratch", (("lr", 0.01),)): 3, ("lite0", "scratch", (("lr", 0.1),)): 2}
    best = rows[0]
    assert (best["model"], best["mode"]) == ("lite0", "finetune") and sum(r["best"] for r in rows) == 1
    assert best["accuracy_ci95_low"] <= best["accuracy_mean"] <= best["accuracy_ci95_high"]
    assert best["accuracy_std"] > 0 and [r["accuracy_mean"] for r in rows] == sorted(
        [r["accuracy_mean"] for r in rows], reverse=True)
    assert all(r["verdict"] in ("worse", "not distinguishable") for r in rows[1:])
    table = markdown(rows)
    assert table.count("\n") == len(rows) + 2 and "**best**" in table


def test_different_test_sets_are_an_error_that_says_so():
    other = IMAGES[:50] + [(f"data/raw/val/c/x{i}.jpg", "ants") for i in range(10)]
    with pytest.raises(UserError, match="test sets differ: a has 60 test images, b has 60, 20 of them not in both"):
        leaderboard([run("a", "lite0", 1, {"finetune": np.ones(60)}),
                     run("b", "lite1", 1, {"finetune": np.ones(60)}, images=other)])


def test_head_to_head_says_whether_b_beats_a():
    a = run("main", "lite0", 1, {"finetune": np.arange(60) % 2, "extract": np.ones(60)})
    b = run("exp", "lite0", 1, {"finetune": np.ones(60), "extract": np.ones(60)})
    result = {r["mode"]: r for r in head_to_head(a, b)}
    assert result["finetune"]["verdict"] == "better" and result["finetune"]["gain"] == pytest.approx(0.5)
    assert result["finetune"]["only_b_right"] == 30 and result["finetune"]["only_a_right"] == 0
    assert result["extract"]["verdict"] == "not distinguishable"


def test_pareto_front_keeps_rows_nothing_beats_on_both():
    rows = [{"accuracy_mean": a, "train_seconds": t} for a, t in ((0.9, 100), (0.8, 10), (0.85, 200), (0.95, 300))]
    assert [(r["accuracy_mean"], r["train_seconds"]) for r in pareto_front(rows)] == [(0.8, 10), (0.9, 100),
                                                                                       (0.95, 300)]
