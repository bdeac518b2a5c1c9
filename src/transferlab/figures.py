"""Matplotlib figures from the files the pipeline wrote; nothing here computes a metric."""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from transferlab.images import load_image  # noqa: E402

MODE_COLORS = {"finetune": "tab:blue", "extract": "tab:orange", "scratch": "tab:gray"}


def read_curve(path: Path) -> tuple[list[int], list[float]]:
    """A dvclive metric TSV -> (epochs from 1, values)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    header, body = rows[0], rows[1:]
    step, value = header.index("step"), len(header) - 1
    return [int(r[step]) + 1 for r in body], [float(r[value]) for r in body]


def plot_curves(curves: dict[str, dict[str, tuple]], metric: str, ylabel: str, path: Path) -> None:
    """One line per mode (and per split if several): `curves[mode][label] = (epochs, values)`."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, lines in curves.items():
        for label, (epochs, values) in lines.items():
            style = "-" if label.startswith("val") else "--"
            ax.plot(epochs, values, style, marker="o", ms=3, color=MODE_COLORS.get(mode), label=f"{mode} {label}")
    ax.set(xlabel="epoch", ylabel=ylabel, title=metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_test_accuracy(evaluation: dict, modes: list[str], path: Path) -> None:
    """Test accuracy per mode with its 95% interval: how much transfer learning buys."""
    fig, ax = plt.subplots(figsize=(6, 4))
    acc = np.array([evaluation[m]["accuracy"] for m in modes])
    low = acc - np.array([evaluation[m]["accuracy_ci95_low"] for m in modes])
    high = np.array([evaluation[m]["accuracy_ci95_high"] for m in modes]) - acc
    ax.bar(modes, acc, yerr=[low, high], capsize=6, color=[MODE_COLORS.get(m) for m in modes])
    for i, value in enumerate(acc):
        ax.text(i, value / 2, f"{value:.1%}", ha="center", color="white", fontweight="bold")
    ax.set(ylim=(0, 1), ylabel="test accuracy (95% CI)",
           title=f"test accuracy, {evaluation[modes[0]]['images']} images")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def plot_confusions(evaluation: dict, modes: list[str], classes: list[str], path: Path) -> None:
    fig, axes = plt.subplots(1, len(modes), figsize=(4 * len(modes), 3.8), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = evaluation[mode]["confusion"]
        matrix = np.array([[rows[f"true_{t}"][f"pred_{p}"] for p in classes] for t in classes])
        ax.imshow(matrix, cmap="Blues")
        for (i, j), n in np.ndenumerate(matrix):
            ax.text(j, i, str(n), ha="center", va="center",
                    color="white" if n > matrix.max() / 2 else "black")
        ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes,
               yticklabels=classes, xlabel="predicted", ylabel="true", title=mode)
    _save(fig, path)


def plot_prediction_grid(predictions_csv: Path, count: int, path: Path, title: str) -> None:
    """Test images with predicted and true labels; wrong predictions in red, shown first."""
    with open(predictions_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    rows.sort(key=lambda r: r["actual"] == r["predicted"])
    rows = rows[:count]
    cols = min(4, len(rows))
    nrows = -(-len(rows) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3 * cols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        ax.imshow(load_image(row["path"], min_side=160))
        ok = row["actual"] == row["predicted"]
        ax.set_title(f"pred {row['predicted']} ({float(row['confidence']):.0%})\ntrue {row['actual']}",
                     color="green" if ok else "red", fontsize=9)
    fig.suptitle(title)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    from transferlab.files import atomic_path
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
