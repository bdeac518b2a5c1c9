"""Learning curves: test accuracy against training images per class, one line per mode, over seeds;
what ImageNet weights are worth in images (the transfer dividend), and from which size a frozen
backbone stops being enough.

A point trains one mode on a nested, seeded subset of the training split and scores it on the
whole test split; val and test are the same at every point. Its training budget is a number of
optimizer steps, not of epochs (BiT's rule for small datasets is a fixed number of steps): each
epoch takes as many images as an epoch of all the training images, so the subset is seen several
times an epoch, and every point is validated `epochs` times. With fixed epochs (`budget: epochs`)
a point of 2 images per class would take a tenth of the steps of one of 20.
"""
from __future__ import annotations

import math
import random
from collections import defaultdict

import numpy as np

from transferlab.images import Sample
from transferlab.metrics import bootstrap_interval, holm, paired_difference, verdict
from transferlab.params import MODES
from transferlab.splits import per_class_subset

TRANSFER_MODES = ("finetune", "extract")


def training_rows(train: list[Sample], per_class: int | None, seed: int, budget: str) -> tuple[list[int], dict]:
    """Indices into `train` that one epoch of a point takes, and what the subset drew.

    budget "steps": the subset of `per_class` images per class, repeated (the remainder drawn with
    `seed`) to as many rows as `train` has: the same optimizer steps per epoch at every size.
    budget "epochs": the subset once.
    """
    subset, drawn = per_class_subset(train, per_class, seed)
    index = {s.path: i for i, s in enumerate(train)}
    rows = [index[s.path] for s in subset]
    if budget == "epochs":
        return rows, {**drawn, "passes_per_epoch": 1}
    passes, rest = divmod(len(train), len(rows))
    extra = random.Random(seed).sample(rows, rest)
    return rows * passes + extra, {**drawn, "passes_per_epoch": round(len(train) / len(rows), 3)}


def images_per_class(drawn: dict) -> float:
    """The x of a point: the mean number of training images per class it actually drew."""
    counts = drawn["counts"].values()
    return sum(counts) / len(counts)


def table(points: list[dict]) -> list[dict]:
    """One row per mode and size: mean test accuracy over seeds, and its 95% interval, which
    resamples seeds and test images (the interval `transferlab compare` gives a row of seeds)."""
    groups = defaultdict(list)
    for point in points:
        groups[point["mode"], point["images_per_class"]].append(point)
    rows = []
    for (mode, size), members in groups.items():
        members.sort(key=lambda point: point["seed"])
        right = right_matrix(members)
        low, high = bootstrap_interval(right, np.random.default_rng(0))
        rows.append({"mode": mode, "images_per_class": size, "x": images_per_class(members[0]["drawn"]),
                     "seeds": [p["seed"] for p in members], "accuracy": float(right.mean()),
                     "ci95_low": low, "ci95_high": high,
                     "accuracy_per_seed": [float(r.mean()) for r in right],
                     "classes_with_fewer": members[0]["drawn"]["classes_with_fewer"]})
    return sorted(rows, key=lambda row: (row["mode"], row["x"]))


def line(rows: list[dict], mode: str) -> list[tuple[float, float]]:
    """(images per class, mean accuracy) of one mode, by size."""
    return sorted((row["x"], row["accuracy"]) for row in rows if row["mode"] == mode)


def images_to_reach(curve: list[tuple[float, float]], accuracy: float) -> tuple[str, float]:
    """Where `curve` first reaches `accuracy`, interpolated linearly in log images: ("=", n);
    ("<=", smallest n) if its first point already does; (">", largest n) if it never does."""
    (x0, a0), rest = curve[0], curve[1:]
    if a0 >= accuracy:
        return "<=", x0
    for x1, a1 in rest:
        if a1 >= accuracy:
            t = (accuracy - a0) / (a1 - a0)
            return "=", math.exp(math.log(x0) + t * (math.log(x1) - math.log(x0)))
        x0, a0 = x1, a1
    return ">", x0


def dividend(rows: list[dict]) -> list[dict]:
    """At each size, how many images per class scratch needs to match each transfer mode."""
    scratch = line(rows, "scratch")
    result = []
    for mode in TRANSFER_MODES:
        for x, accuracy in line(rows, mode) if scratch else []:
            relation, needed = images_to_reach(scratch, accuracy)
            result.append({"mode": mode, "x": x, "accuracy": accuracy, "scratch_needs": relation, "images": needed,
                           "factor": needed / x, "says": dividend_sentence(mode, x, accuracy, relation, needed)})
    return result


def dividend_sentence(mode: str, x: float, accuracy: float, relation: str, needed: float) -> str:
    at = f"at {x:g} images per class, {mode} ({accuracy:.1%})"
    if relation == ">" and needed <= x:
        return f"{at}: scratch does not reach it with all the {needed:g} per class there are"
    if relation == ">":
        return (f"{at}: scratch needs more than the {needed:g} per class there are, so ImageNet weights are "
                f"worth at least {needed / x:.1f}x the data")
    if relation == "<=":
        return f"{at}: scratch reaches it with {needed:g} per class or fewer: no dividend measurable here"
    if needed <= x:
        return f"{at}: scratch reaches it with about {needed:.0f} per class: no dividend"
    return (f"{at}: scratch needs about {needed:.0f} per class, so ImageNet weights are worth about "
            f"{needed / x:.1f}x the data")


def crossover(points: list[dict], rows: list[dict]) -> dict:
    """The smallest size at which finetune beats extract: at each size both have, issue 22's
    paired test over seeds and test images, Holm-adjusted over the sizes (one question asked at
    each size); "never" if no size shows it."""
    sizes = sorted({(row["x"], row["images_per_class"]) for row in rows if row["mode"] == "finetune"}
                   & {(row["x"], row["images_per_class"]) for row in rows if row["mode"] == "extract"})
    if not sizes:
        return {"from_images_per_class": None, "says": "no crossover: it needs finetune and extract in curve.modes",
                "tests": []}
    tests = []
    for x, size in sizes:
        a, b = (right_matrix([p for p in points if p["mode"] == mode and p["images_per_class"] == size])
                for mode in ("finetune", "extract"))
        tests.append({"x": x, "images_per_class": size, **paired_difference(a, b), "seeds": min(len(a), len(b))})
    for test, adjusted in zip(tests, holm([t["p_value"] for t in tests])):
        test["p_adjusted"] = adjusted
        test["verdict"] = verdict(test["gap"], adjusted, test["seeds"], test["seeds_needed"])
    better = [t for t in tests if t["verdict"] == "better"]
    largest = max((x for x, _ in sizes), default=0)
    says = (f"finetune first beats extract at {better[0]['x']:g} images per class" if better
            else f"a frozen backbone (extract) is enough: finetune never beats it, up to {largest:g} images per class")
    return {"from_images_per_class": better[0]["x"] if better else None, "says": says, "tests": tests}


def right_matrix(points: list[dict]) -> np.ndarray:
    """(points, test images): 1 where the point's model got the image right (its "right" string)."""
    return np.array([[c == "1" for c in p["right"]] for p in points], dtype=float)


def markdown(rows: list[dict], dividends: list[dict], cross: dict) -> str:
    """The curve as a table (accuracy and 95% interval per mode and size), then what it says."""
    modes = sorted({row["mode"] for row in rows}, key=MODES.index)
    sizes = sorted({(row["x"], row["images_per_class"]) for row in rows})
    cell = {(row["mode"], row["images_per_class"]): row for row in rows}
    lines = ["| images per class | " + " | ".join(modes) + " |", "|---:|" + "---|" * len(modes)]
    for x, size in sizes:
        label = f"{x:g}" if size != "all" else f"all ({x:g})"
        cells = [f"{c['accuracy']:.3f} [{c['ci95_low']:.3f}, {c['ci95_high']:.3f}] ({len(c['seeds'])} seeds)"
                 if (c := cell.get((mode, size))) else "" for mode in modes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Test accuracy, mean over seeds; in brackets the 95% interval over seeds and test images.", ""]
    short = {row["images_per_class"]: row["classes_with_fewer"] for row in rows if row["classes_with_fewer"]}
    lines += [f"- at {size} per class, classes with fewer train on all they have: "
              + ", ".join(f"{label} {n}" for label, n in fewer.items()) for size, fewer in short.items()]
    lines += [f"- {d['says']}" for d in dividends] or ["- no dividend: it needs scratch and finetune or extract "
                                                       "in curve.modes"]
    lines += [f"- {cross['says']}"]
    return "\n".join(lines) + "\n"


def seconds(points: list[dict]) -> dict:
    """Where the points' time went: training, scoring the test images, and everything else in
    their processes after imports (building the model, opening the caches, the embedding pass)."""
    fit = sum(p["seconds"]["fit"] for p in points)
    test = sum(p["seconds"]["test"] for p in points)
    return {"points": len(points), "training": fit, "testing": test,
            "rest_after_imports": sum(p["seconds"]["after_imports"] for p in points) - fit - test}


def write_plot_data(rows: list[dict], folder) -> None:
    """One CSV per mode (mode, images per class, accuracy, interval) for `dvc plots show`."""
    for mode in sorted({row["mode"] for row in rows}):
        lines = ["mode,images_per_class,accuracy,ci95_low,ci95_high"]
        lines += [f"{mode},{row['x']:g},{row['accuracy']:.4f},{row['ci95_low']:.4f},{row['ci95_high']:.4f}"
                  for row in sorted(rows, key=lambda r: r["x"]) if row["mode"] == mode]
        (folder / f"{mode}.csv").write_text("\n".join(lines) + "\n")
