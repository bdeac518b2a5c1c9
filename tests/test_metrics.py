import numpy as np
import pytest

from transferlab.metrics import classification_metrics, compare, mcnemar_p, wilson_interval


def test_wilson_interval_matches_the_textbook_and_stays_in_range():
    low, high = wilson_interval(143, 153)
    assert (round(low, 3), round(high, 3)) == (0.884, 0.964)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 10)[0] == 0.0


def test_classification_metrics_on_a_known_example():
    targets = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8], [0.1, 0.9], [0.6, 0.4],
                      [0.35, 0.65]])
    m = classification_metrics(targets, probs, ["ants", "bees"])
    assert m["accuracy"] == 6 / 8 and m["correct"] == 6 and m["images"] == 8
    assert m["recall_per_class"] == {"ants": 2 / 3, "bees": 4 / 5}
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert m["confusion"] == {"true_ants": {"pred_ants": 2, "pred_bees": 1},
                              "true_bees": {"pred_ants": 1, "pred_bees": 4}}
    assert m["roc_auc"] == pytest.approx(14 / 15)  # 14 of 15 (bee, ant) pairs ranked right
    assert m["log_loss"] == pytest.approx(-np.mean(np.log(probs[np.arange(8), targets])))
    assert m["accuracy_ci95_low"] < m["accuracy"] < m["accuracy_ci95_high"]


def test_mcnemar_counts_only_discordant_images():
    same = np.array([True] * 50 + [False] * 10)
    assert mcnemar_p(same, same) == 1.0
    better = np.array([True] * 60)
    assert mcnemar_p(better, same) == pytest.approx(2 * 0.5 ** 10)
    result = compare({"finetune": better, "scratch": same}, "finetune", "scratch")
    assert result["accuracy_gain"] == pytest.approx(10 / 60)
    assert (result["only_finetune_right"], result["only_scratch_right"], result["significant"]) == (10, 0, True)
