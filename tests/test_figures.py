"""Figures from the pipeline's files, on the edge cases that once crashed the plot stage."""
import csv

import numpy as np
import pytest
from conftest import make_image
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import same_color
from matplotlib.container import ErrorbarContainer

from transferlab.figures import (
    MODE_COLOURS,
    plot_confusions,
    plot_curves,
    plot_leaderboard,
    plot_learning_curve,
    plot_prediction_grid,
    plot_test_accuracy,
    plot_top_losses,
    short_label,
)
from transferlab.metrics import classification_metrics

MODES = ["finetune", "extract", "scratch"]
EPOCHS = {"finetune": 12, "extract": 12, "scratch": 30}


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
    plot_test_accuracy(evaluation, MODES, tmp_path / "acc.png", "resnet18", EPOCHS)
    assert is_png(tmp_path / "acc.png")


def test_a_class_without_test_images_and_a_single_predicted_class(tmp_path):
    classes = ["ants", "bees", "wasps"]
    targets = [0] * 5 + [1] * 5  # no wasps in the test split
    evaluation = evaluation_for(targets, [targets, [0] * 10, [2] * 10], classes)
    assert "roc_auc" not in evaluation["finetune"]  # undefined with a class absent
    plot_test_accuracy(evaluation, MODES, tmp_path / "acc.png", "resnet18", EPOCHS)
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
    classes = [f"a rather long class name number {i}" for i in range(n)]
    images = [str(make_image(tmp_path / f"{i}.jpg", (20 * i % 255, 90, 9), i)) for i in range(10)]
    mistakes = [{"path": p, "true": classes[i % n], "predicted": classes[(i + 1) % n], "confidence": 0.9 - i / 20,
                 "loss": 3.0} for i, p in enumerate(images)]
    evaluation = {"finetune": {"top_losses": mistakes}, "extract": {"top_losses": mistakes[:3]},
                  "scratch": {"top_losses": []}}  # scratch got every test image right
    plot_top_losses(evaluation, MODES, tmp_path / "top.png")
    assert is_png(tmp_path / "top.png")


# What a reader of the slides relies on: one colour per mode, titles that say what is compared,
# ticks that are the sizes asked, labels that neither cross a bar nor leave the figure.

def leaderboard_rows(n_extra=0):
    rows = []
    for i, (model, mode) in enumerate([("resnet18", "finetune"), ("convnext_tiny.fb_in22k_ft_in1k", "extract"),
                                       ("resnet18", "scratch"), *[("resnet50", "finetune")] * n_extra]):
        acc = 0.95 - 0.1 * i
        rows.append({"model": model, "mode": mode, "params": {"train.lr": 0.001 * (i + 1), "train.weight_decay": 0.05},
                     "seeds": 3, "accuracy_mean": acc, "accuracy_ci95_low": acc - 0.04,
                     "accuracy_ci95_high": min(1.0, acc + 0.04), "train_seconds": [60.0, 20.0, 90.0][i % 3] * (i + 1),
                     "best": i == 0})
    return rows


def curve_rows():
    return [{"mode": mode, "images_per_class": size, "x": x, "seeds": [0, 1, 2], "accuracy": acc,
             "ci95_low": acc - 0.05, "ci95_high": acc + 0.05}
            for mode, top in [("finetune", 0.9), ("extract", 0.85), ("scratch", 0.5)]
            for size, x, acc in [(2, 2, top / 3), (5, 5, top / 2), (10, 10, top * 0.8), ("all", 97.5, top)]]


def line_colours(ax):
    return {line.get_label().split()[0]: line.get_color() for line in ax.get_lines()
            if line.get_label().split()[0] in MODE_COLOURS}


def test_every_figure_colours_a_mode_with_its_one_colour(tmp_path):
    curves = plot_curves({m: {"train": ([1, 2], [1.0, 0.5]), "val": ([1, 2], [1.1, 0.7])} for m in MODES},
                         "loss, resnet18", "cross-entropy", tmp_path / "loss.png")
    learning = plot_learning_curve(curve_rows(), tmp_path / "curve.png", "resnet18")
    for fig in (curves, learning):
        colours = line_colours(fig.axes[0])
        assert set(colours) == set(MODES) and all(same_color(colours[m], MODE_COLOURS[m]) for m in MODES)

    targets = [0] * 10 + [1] * 10
    evaluation = evaluation_for(targets, [targets, targets, [0] * 20], ["ants", "bees"])
    bars = plot_test_accuracy(evaluation, MODES, tmp_path / "acc.png", "resnet18", EPOCHS).axes[0].patches
    assert all(same_color(bar.get_facecolor(), MODE_COLOURS[m]) for bar, m in zip(bars, MODES))

    board = plot_leaderboard(rows := leaderboard_rows(), rows[:2], tmp_path / "board.png")
    markers = [line for line in board.axes[0].get_lines() if line.get_marker() == "o"]
    assert [line.get_color() for line in markers] == [MODE_COLOURS[r["mode"]] for r in rows]
    assert [line.get_color() for line in board.axes[1].get_lines()] == [MODE_COLOURS[r["mode"]] for r in rows]


def test_top_losses_title_each_mistake_in_its_modes_colour(tmp_path):
    image = str(make_image(tmp_path / "0.jpg", (90, 90, 9), 0))
    mistake = {"path": image, "true": "ants", "predicted": "bees", "confidence": 0.9, "loss": 3.0}
    fig = plot_top_losses({m: {"top_losses": [mistake]} for m in MODES}, MODES, tmp_path / "top.png")
    titles = [ax.title for ax in fig.axes if ax.get_title()]
    assert [t.get_text().split(":")[0] for t in titles] == MODES
    assert all(same_color(t.get_color(), MODE_COLOURS[m]) for t, m in zip(titles, MODES))


def test_test_accuracy_title_names_the_model_and_each_modes_epochs(tmp_path):
    targets = [0] * 10 + [1] * 10
    evaluation = evaluation_for(targets, [targets] * 3, ["ants", "bees"])
    title = plot_test_accuracy(evaluation, MODES, tmp_path / "acc.png", "resnet18", EPOCHS).axes[0].get_title()
    assert "resnet18" in title and "finetune 12, extract 12, scratch 30" in title


def test_learning_curve_ticks_are_the_sizes_asked(tmp_path):
    ax = plot_learning_curve(curve_rows(), tmp_path / "curve.png", "resnet18").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "5", "10", "all (≈98)"]
    assert list(ax.get_xticks()) == [2, 5, 10, 97.5]  # "all" sits at the mean count it drew
    assert ax.get_title().startswith("resnet18 learning curve: mean of 3 seeds")


def test_leaderboard_says_what_it_compares_with_a_legend_for_modes_and_front(tmp_path):
    fig = plot_leaderboard(rows := leaderboard_rows(), rows[:2], tmp_path / "board.png")
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:3] == MODES and any("best" in t for t in legend) and any("Pareto front" in t for t in legend)
    assert fig.get_suptitle().startswith("test accuracy (95% interval) by model and mode")
    assert "3 rows, 3 seeds per row" in fig.get_suptitle()


def mark_boxes(fig, renderer):
    """Display boxes of every error bar (each segment, each cap) and every marker of a figure."""
    boxes = []
    for ax in fig.axes:
        for container in ax.containers:
            if isinstance(container, ErrorbarContainer):
                boxes += [p.transformed(c.get_transform()).get_extents() for c in container.lines[2]
                          for p in c.get_paths()]
        boxes += [line.get_window_extent(renderer) for line in ax.lines]  # markers and caps
    return boxes


@pytest.mark.parametrize("extra", [0, 12])
def test_leaderboard_labels_cross_no_bar_and_stay_in_the_figure(tmp_path, extra):
    fig = plot_leaderboard(rows := leaderboard_rows(extra), rows[:1], tmp_path / "board.png")
    canvas = FigureCanvasAgg(fig)  # a closed figure: draw it as savefig did
    canvas.draw()
    renderer = canvas.get_renderer()
    drawn = [ax.get_tightbbox(renderer) for ax in fig.axes] + [fig.legends[0].get_window_extent(renderer)]
    assert all(fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1
               for box in drawn), "a label leaves the figure"
    marks = mark_boxes(fig, renderer)
    assert len(marks) == 5 * len(rows)  # per row: its interval, two caps, its accuracy and its seconds
    texts = [*fig.axes[0].get_yticklabels(), *fig.axes[0].texts, *fig.legends[0].get_texts(), fig._suptitle]
    for text in texts:
        box = text.get_window_extent(renderer)
        assert not any(box.overlaps(mark) for mark in marks), f"{text.get_text()!r} crosses a bar"
    assert any("…" in t.get_text() for t in fig.axes[0].get_yticklabels())  # the long model name, shortened
