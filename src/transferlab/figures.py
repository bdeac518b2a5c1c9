"""Matplotlib figures from the files the pipeline wrote; nothing here computes a metric."""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, PercentFormatter  # noqa: E402

from transferlab.images import load_image  # noqa: E402
from transferlab.params import MODES  # noqa: E402

# One colour per mode in every figure, so that scratch is the same grey on every slide.
MODE_COLOURS = {"finetune": "tab:blue", "extract": "tab:orange", "scratch": "tab:gray"}


def read_curve(path: Path) -> tuple[list[int], list[float]]:
    """A dvclive metric TSV -> (epochs from 1, values)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    header, body = rows[0], rows[1:]
    step, value = header.index("step"), len(header) - 1
    return [int(r[step]) + 1 for r in body], [float(r[value]) for r in body]


def plot_curves(curves: dict[str, dict[str, tuple]], metric: str, ylabel: str, path: Path) -> Figure:
    """One line per mode (and per split if several): `curves[mode][label] = (epochs, values)`;
    `metric` is the title (name the model in it). Returns the figure written."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, lines in curves.items():
        for label, (epochs, values) in lines.items():
            style = "-" if label.startswith("val") else "--"
            ax.plot(epochs, values, style, marker="o", ms=3, color=MODE_COLOURS[mode], label=f"{mode} {label}")
    ax.set(xlabel="epoch", ylabel=ylabel, title=metric)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_test_accuracy(evaluation: dict, modes: list[str], path: Path, model: str, epochs: dict[str, int]) -> Figure:
    """Test accuracy per mode with its 95% interval: how much transfer learning buys; the title
    names the model and the epochs each mode trained. Returns the figure written."""
    fig, ax = plt.subplots(figsize=(6, 4))
    acc = np.array([evaluation[m]["accuracy"] for m in modes])
    # Clipped at 0: matplotlib refuses a negative error bar, which rounding can produce at 100%.
    low = np.clip(acc - np.array([evaluation[m]["accuracy_ci95_low"] for m in modes]), 0, None)
    high = np.clip(np.array([evaluation[m]["accuracy_ci95_high"] for m in modes]) - acc, 0, None)
    ax.bar(modes, acc, yerr=[low, high], capsize=6, color=[MODE_COLOURS[m] for m in modes])
    for i, value in enumerate(acc):
        ax.text(i, value / 2, f"{value:.1%}", ha="center", color="white", fontweight="bold")
    trained = ", ".join(f"{m} {epochs[m]}" for m in modes)
    ax.set(ylim=(0, 1), ylabel="test accuracy (95% CI)")
    ax.set_title(f"{model}: test accuracy on {evaluation[modes[0]]['images']} test images\n"
                 f"epochs trained: {trained}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


# Beyond these many classes a confusion matrix shows no cell counts, then no class names: a heat map.
COUNTS_UP_TO, NAMES_UP_TO = 15, 40


def plot_confusions(evaluation: dict, modes: list[str], classes: list[str], path: Path) -> None:
    """One confusion matrix per mode, legible from 2 to hundreds of classes: counts while they
    fit, then the share of each true class (row) as colour only."""
    n = len(classes)
    side = min(3.8 + 0.22 * n, 9)
    fig, axes = plt.subplots(1, len(modes), figsize=(side * len(modes), side), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        matrix = np.array(evaluation[mode]["confusion"])
        counts = n <= COUNTS_UP_TO
        shown = matrix if counts else matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
        ax.imshow(shown, cmap="Blues", interpolation="nearest")
        if counts:
            for (i, j), count in np.ndenumerate(matrix):
                ax.text(j, i, str(count), ha="center", va="center", fontsize=9 if n <= 8 else 7,
                        color="white" if count > matrix.max() / 2 else "black")
        if n <= NAMES_UP_TO:
            names = [short_label(c) for c in classes]
            ax.set_xticks(range(n), names, rotation=0 if n <= 4 else 90, fontsize=9 if n <= 10 else 7)
            ax.set_yticks(range(n), names, fontsize=9 if n <= 10 else 7)
        else:
            ax.set(xticks=[], yticks=[])
        unit = "" if counts else ", share of each true class"
        ax.set(xlabel="predicted", ylabel="true", title=f"{mode}{unit}")
    _save(fig, path)


def short_label(name: str, width: int = 14) -> str:
    """A class name cut to `width` characters in the middle (names often differ only at the end),
    so that labels do not run into one another."""
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    return name[:head] + "…" + name[len(name) - (width - 1 - head):]


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
        ax.set_title(f"pred {short_label(row['predicted'], 20)} ({float(row['confidence']):.0%})\n"
                     f"true {short_label(row['actual'], 20)}", color="green" if ok else "red", fontsize=9)
    fig.suptitle(title)
    _save(fig, path)


def plot_top_losses(evaluation: dict, modes: list[str], path: Path, per_mode: int = 8) -> Figure:
    """Per mode (a row each), its mistakes with the largest loss: true class, predicted class
    and confidence, names shortened so that a row stays legible with 100 classes."""
    cols = max([min(per_mode, len(evaluation[m]["top_losses"])) for m in modes] + [1])
    fig, axes = plt.subplots(len(modes), cols, figsize=(2.6 * cols, 3.0 * len(modes)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, mode in zip(axes, modes):
        mistakes = evaluation[mode]["top_losses"][:per_mode]
        if not mistakes:
            row[0].text(0.5, 0.5, f"{mode}: no test image wrong", ha="center", va="center", fontsize=10,
                        color=MODE_COLOURS[mode])
        for ax, mistake in zip(row, mistakes):
            ax.imshow(load_image(mistake["path"], min_side=160))
            ax.set_title(f"{mode}: {mistake['confidence']:.0%}\npred {short_label(mistake['predicted'], 18)}\n"
                         f"true {short_label(mistake['true'], 18)}", color=MODE_COLOURS[mode], fontsize=8)
    fig.suptitle("the mistakes with the largest loss, per mode (where mislabeled images show)")
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Figure:
    """Write `fig` as a PNG (atomically) and close it; returns it, laid out, for tests to inspect."""
    from transferlab.files import atomic_path
    if fig.get_layout_engine() is None:  # one that brought its own layout (constrained) keeps it
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return fig


def plot_leaderboard(rows: list[dict], front: list[dict], path: Path) -> Figure:
    """The leaderboard as a slide: one line per row, best first, its test accuracy with the 95%
    interval (left) and its train seconds (right), where the Pareto front's rows (no other row
    both more accurate and faster) are outlined. Labels are the y ticks: they never cross a bar."""
    height = 1.9 + 0.32 * len(rows)
    fig, (acc_ax, time_ax) = plt.subplots(1, 2, sharey=True, figsize=(10, height), width_ratios=[3, 2],
                                          layout="constrained")
    on_front = {id(row) for row in front}
    for y, row in enumerate(rows):
        _leaderboard_row(acc_ax, time_ax, y, row, id(row) in on_front)
    acc_ax.set_yticks(range(len(rows)), [_leaderboard_label(row) for row in rows], fontsize=8)
    acc_ax.invert_yaxis()  # best (row 0) on top, as in leaderboard.md
    low, high = min(r["accuracy_ci95_low"] for r in rows), max(r["accuracy_ci95_high"] for r in rows)
    span = max(high - low, 0.02)
    acc_ax.set_xlim(low - 0.05 * span, high + 0.3 * span)  # room for the value beside each bar
    acc_ax.set_xticks([t for t in acc_ax.get_xticks() if 0 <= t <= 1])  # none past 100%, in that room
    acc_ax.set_xlim(low - 0.05 * span, high + 0.3 * span)
    acc_ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    acc_ax.set(xlabel="test accuracy (mean over seeds, 95% interval)")
    time_ax.set(xlabel="train seconds, mean over seeds (log)")
    if any(r["train_seconds"] for r in rows):
        time_ax.set_xscale("log")
        time_ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        time_ax.xaxis.set_major_formatter(FuncFormatter(lambda seconds, _: f"{seconds:g}"))
        time_ax.xaxis.set_minor_formatter(NullFormatter())
        time_ax.margins(x=0.15)
    for ax in (acc_ax, time_ax):
        ax.grid(axis="x", alpha=0.3)
    seeds = sorted({r["seeds"] for r in rows})
    fig.suptitle(f"test accuracy (95% interval) by model and mode, and train time\n{len(rows)} rows, "
                 f"{seeds[0] if len(seeds) == 1 else f'{seeds[0]}–{seeds[-1]}'} seeds per row, best first",
                 fontsize=11)
    fig.legend(handles=_leaderboard_legend(rows, bool(front)), loc="outside lower center", ncol=3, fontsize=8)
    return _save(fig, path)


def _leaderboard_row(acc_ax, time_ax, y: int, row: dict, on_front: bool) -> None:
    colour, acc = MODE_COLOURS[row["mode"]], row["accuracy_mean"]
    err = [[max(0.0, acc - row["accuracy_ci95_low"])], [max(0.0, row["accuracy_ci95_high"] - acc)]]
    acc_ax.errorbar(acc, y, xerr=err, fmt="o", ms=7, capsize=4, color=colour,
                    markeredgecolor="black" if row["best"] else colour, markeredgewidth=1.5)
    acc_ax.annotate(f"{acc:.1%}", (row["accuracy_ci95_high"], y), xytext=(8, 0), textcoords="offset points",
                    va="center", fontsize=8)
    if row["train_seconds"]:  # a point, not a bar: on a log scale a bar's length means nothing
        time_ax.plot(row["train_seconds"], y, "s", ms=8, color=colour, markeredgewidth=1.5,
                     markeredgecolor="black" if on_front else colour)


def _leaderboard_label(row: dict) -> str:
    """Model and mode in full (the model's name shortened), then the params that differ."""
    params = " ".join(f"{k.split('.')[-1]}={v}" for k, v in row["params"].items() if k != "model")
    return f"{short_label(str(row['model']), 18)} {row['mode']} {short_label(params, 28)}".strip()


def _leaderboard_legend(rows: list[dict], with_front: bool) -> list:
    def outlined(marker: str, label: str) -> Line2D:
        return Line2D([], [], marker=marker, linestyle="", markerfacecolor="white", markeredgecolor="black",
                      markeredgewidth=1.5, label=label)

    handles = [Patch(color=MODE_COLOURS[m], label=m) for m in MODES if any(r["mode"] == m for r in rows)]
    handles.append(outlined("o", "best row (outlined)"))
    if with_front:
        handles.append(outlined("s", "Pareto front (outlined): no row both more accurate and faster"))
    return handles


def plot_lr_find(found: dict, path: Path, title: str) -> None:
    """The lr range test as a person checks it: the loss against the lr (log scale), raw and
    smoothed, and the pick."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(found["lrs"], found["losses"], color="0.75", label="loss per step")
    ax.plot(found["lrs"], found["smoothed"], color="black", label="smoothed")
    ax.axvline(found["suggestion"], color="tab:red", linestyle="--",
               label=f"pick: {found['suggestion']:.3g} ({found['rule']})")
    ax.set_xscale("log")
    ax.set(xlabel="learning rate (log scale)", ylabel="training loss", title=f"lr range test: {title}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, Path(path))


def plot_predictions(predictions: list, path: str | Path, title: str, columns: int = 4) -> None:
    """Images with their predicted class and confidence, as the tutorial's visualize_model shows them."""
    shown = predictions[:32]
    cols = max(1, min(columns, len(shown)))
    rows = max(1, -(-len(shown) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, prediction in zip(axes.flat, shown):
        ax.imshow(load_image(prediction.path, min_side=160))
        ax.set_title(f"{short_label(prediction.label, 20)} ({prediction.confidence:.0%})\n"
                     f"{short_label(Path(prediction.path).name, 24)}", fontsize=9)
    fig.suptitle(f"{title}: {len(shown)} of {len(predictions)} images" if len(predictions) > len(shown) else title)
    _save(fig, Path(path))


def plot_learning_curve(rows: list[dict], path: Path, model: str) -> Figure:
    """Test accuracy against training images per class (log x), one line per mode, with the 95%
    interval over seeds and test images as a band. A tick is a size asked, at the mean count
    drawn; `all` says that count ("all (≈97)"). Returns the figure written."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode in MODES:
        own = sorted((row for row in rows if row["mode"] == mode), key=lambda row: row["x"])
        if not own:
            continue
        x, colour = [row["x"] for row in own], MODE_COLOURS[mode]
        ax.plot(x, [row["accuracy"] for row in own], marker="o", color=colour, label=mode)
        ax.fill_between(x, [row["ci95_low"] for row in own], [row["ci95_high"] for row in own],
                        color=colour, alpha=0.2, linewidth=0)
    ticks = {}
    for row in sorted(rows, key=lambda row: row["x"]):
        ticks.setdefault(row["images_per_class"], row["x"])
    ax.set_xscale("log")
    ax.set_xticks(list(ticks.values()), [_size_label(size, x) for size, x in ticks.items()])
    ax.minorticks_off()
    ax.set_xlabel("training images per class (log scale)")
    ax.set_ylabel("test accuracy")
    seeds = max(len(row["seeds"]) for row in rows)
    ax.set_title(f"{model} learning curve: mean of {seeds} seeds, 95% band over seeds and test images", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _size_label(size, x: float) -> str:
    """A size asked as a tick: "10", or "all (≈97)" for every training image."""
    return f"all (≈{x:.0f})" if size == "all" else str(size)
