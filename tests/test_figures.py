"""Figures from the pipeline's files, on the edge cases that once crashed the plot stage."""
import csv

import numpy as np
import pytest
from conftest import make_image

from transferlab.figures import plot_confusions, plot_curves, plot_prediction_grid, plot_test_accuracy, short_label
from transferlab.metrics import classification_metrics

MODES = ["finetune", "extract", "scratch"]


def evaluation_for(targets, predictions_per_mode, classes):
    report = {"classes": classes}
    for mode, predicted in zip(MODES, predictions_per_mode):
        probs = np.full((len(targets), len(classes)), 0.1 / max(1, len(classes) - 1))
        probs[np.arange(len(targets)), predicted] = 0.9
        report[mode] = classification_metrics(np.array(targets), probs / probs.sum(1, keepdims=True), classes)
    return report


def is_png(path):
    return path.read_bytes()[:4] == b"\x89PNG"


def test_every_test_image_right_does_not_crash_the_accuracy_plot(tmp_path):
    targets = [0] * 30 + [1] * 30  # 60/60: the Wilson bound once came out below 1.0
    evaluation = evaluation_for(targets, [targets, targets, [0] * 60], ["ants", "bees"])
    plot_test_accuracy(evaluation, MODES, tmp_path / "acc.png")
    assert is_png(tmp_path / "acc.png")


def test_a_class_without_test_images_and_a_single_predicted_class(tmp_path):
    classes = ["ants", "bees", "wasps"]
    targets = [0] * 5 + [1] * 5  # no wasps in the test split
    evaluation = evaluation_for(targets, [targets, [0] * 10, [2] * 10], classes)
    assert "roc_auc" not in evaluation["finetune"]  # undefined with a class absent
    plot_test_accuracy(evaluation, MODES, tmp_path / "acc.png")
    plot_confusions(evaluation, MODES, classes, tmp_path / "confusion.png")
    assert is_png(tmp_path / "acc.png") and is_png(tmp_path / "confusion.png")


def test_a_single_epoch_curve(tmp_path):
    plot_curves({m: {"val": ([1], [0.5])} for m in MODES}, "validation accuracy", "accuracy", tmp_path / "c.png")
    assert is_png(tmp_path / "c.png")


@pytest.mark.parametrize("n", [2, 10, 50, 200])
def test_confusion_matrices_from_2_to_200_classes(tmp_path, n):
    classes = [f"a rather long class name number {i}" for i in range(n)]
    rng = np.random.default_rng(n)
    targets = np.arange(3 * n) % n
    evaluation = evaluation_for(targets, [rng.integers(0, n, 3 * n) for _ in MODES], classes)
    plot_confusions(evaluation, MODES, classes, tmp_path / "confusion.png")
    assert is_png(tmp_path / "confusion.png")


def test_long_labels_are_shortened():
    assert short_label("ants") == "ants"
    assert short_label("a rather long class name 7") == "a rath… name 7" and len(short_label("x" * 40)) == 14


def test_prediction_grid_with_fewer_images_than_asked(tmp_path):
    rows = [[str(make_image(tmp_path / f"{i}.jpg", (9 * i, 90, 9), i)), "ants", "bees" if i else "ants", "0.9"]
            for i in range(3)]
    with open(tmp_path / "p.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "actual", "predicted", "confidence"], *rows])
    plot_prediction_grid(tmp_path / "p.csv", 16, tmp_path / "grid.png", "grid")
    assert is_png(tmp_path / "grid.png")


@pytest.mark.parametrize("n", [2, 100])
def test_top_losses_stay_legible_from_2_to_100_classes(tmp_path, n):
    from transferlab.figures import plot_top_losses

    classes = [f"a rather long class name number {i}" for i in range(n)]
    images = [str(make_image(tmp_path / f"{i}.jpg", (20 * i % 255, 90, 9), i)) for i in range(10)]
    mistakes = [{"path": p, "true": classes[i % n], "predicted": classes[(i + 1) % n], "confidence": 0.9 - i / 20,
                 "loss": 3.0} for i, p in enumerate(images)]
    evaluation = {"finetune": {"top_losses": mistakes}, "extract": {"top_losses": mistakes[:3]},
                  "scratch": {"top_losses": []}}  # scratch got every test image right
    plot_top_losses(evaluation, MODES, tmp_path / "top.png")
    assert is_png(tmp_path / "top.png")
