import numpy as np
import pytest

from transferlab.metrics import classification_metrics, compare, headline, mcnemar_p, most_confused, wilson_interval


def test_wilson_interval_matches_the_textbook_and_stays_in_range():
    low, high = wilson_interval(143, 153)
    assert (round(low, 3), round(high, 3)) == (0.884, 0.964)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 10)[0] == 0.0


def test_wilson_bounds_never_cross_the_observed_proportion():
    # 60/60 once gave an upper bound of 0.9999999999999999, and a negative error bar in the plot.
    for total in range(1, 400):
        for correct in (0, 1, total - 1, total):
            low, high = wilson_interval(correct, total)
            assert 0.0 <= low <= correct / total <= high <= 1.0, (correct, total)
    assert wilson_interval(60, 60)[1] == 1.0


def test_classification_metrics_on_a_known_example():
    targets = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8], [0.1, 0.9], [0.6, 0.4],
                      [0.35, 0.65]])
    m = classification_metrics(targets, probs, ["ants", "bees"])
    assert m["accuracy"] == 6 / 8 and m["correct"] == 6 and m["images"] == 8
    assert m["recall_per_class"] == {"ants": 2 / 3, "bees": 4 / 5}
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert m["confusion"] == [[2, 1], [1, 4]]
    assert m["most_confused"] == [{"true": "ants", "predicted": "bees", "images": 1},
                                  {"true": "bees", "predicted": "ants", "images": 1}]
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


def test_most_confused_lists_the_largest_off_diagonal_cells_first():
    confusion = np.array([[5, 0, 3], [1, 7, 0], [4, 2, 9]])
    pairs = most_confused(confusion, ["a", "b", "c"], top=3)
    assert [(p["true"], p["predicted"], p["images"]) for p in pairs] == [("c", "a", 4), ("a", "c", 3), ("c", "b", 2)]


def test_headline_keeps_a_few_numbers_whatever_the_number_of_classes():
    rng = np.random.default_rng(0)
    classes = [f"class{i:03d}" for i in range(120)]
    targets = np.arange(600) % 120
    probs = rng.dirichlet(np.ones(120), size=600)
    full = classification_metrics(targets, probs, classes)
    assert sorted(headline(full)) == sorted(["accuracy", "accuracy_ci95_low", "accuracy_ci95_high",
                                             "balanced_accuracy", "roc_auc"])


def test_top_losses_are_the_wrong_images_the_model_was_surest_of():
    from transferlab.metrics import top_losses

    classes = ["ants", "bees", "wasps"]
    probs = np.array([[0.9, 0.05, 0.05],   # right
                      [0.2, 0.7, 0.1],     # wrong, 70% sure
                      [0.05, 0.05, 0.9],   # wrong, 90% sure
                      [0.4, 0.35, 0.25]])  # right, barely
    targets = np.array([0, 0, 1, 0])
    found = top_losses(probs, targets, ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], classes)
    assert [(m["path"], m["true"], m["predicted"], m["confidence"]) for m in found] == [
        ("c.jpg", "bees", "wasps", 0.9), ("b.jpg", "ants", "bees", 0.7)]
    assert found[0]["loss"] == pytest.approx(-np.log(0.05), abs=1e-4)
    assert top_losses(probs, targets, list("abcd"), classes, top=1)[0]["path"] == "c"
    assert top_losses(probs[:1], targets[:1], ["a"], classes) == []


def test_top_losses_are_ordered_by_loss_not_by_the_wrong_class_confidence():
    # fastai's order: -log p(true class). With three classes a less confident mistake can have
    # the larger loss: b.jpg gives its true class 0.05 (loss 3.0) though it is only 50% sure of
    # the wrong one; c.jpg is 80% sure of a wrong class but gives the true one 0.2 (loss 1.6).
    from transferlab.metrics import top_losses

    probs = np.array([[0.2, 0.8, 0.0], [0.05, 0.5, 0.45], [0.1, 0.3, 0.6], [0.7, 0.2, 0.1]])
    targets = np.array([0, 0, 1, 0])
    found = top_losses(probs, targets, ["c.jpg", "b.jpg", "d.jpg", "a.jpg"], ["ants", "bees", "wasps"])
    assert [m["path"] for m in found] == ["b.jpg", "c.jpg", "d.jpg"]
    assert [m["loss"] for m in found] == sorted((m["loss"] for m in found), reverse=True)
    assert found[0]["confidence"] == 0.5 and found[0]["loss"] == pytest.approx(-np.log(0.05), abs=1e-4)
