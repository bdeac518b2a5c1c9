"""Learning curves, the summary: test accuracy against training images per class, one line per
mode, over seeds; what ImageNet weights are worth in images (the transfer dividend), and from
which size a frozen backbone stops being enough. Every claim rests on the paired test over seeds
and test images that `transferlab compare` uses (metrics.paired_difference). What a point runs is
in curve_point.py.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from transferlab.metrics import bootstrap_interval, judge
from transferlab.params import MODES

TRANSFER_MODES = ("finetune", "extract")


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
    return sorted(rows, key=lambda row: (MODES.index(row["mode"]), row["x"]))


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


def size_tests(points: list[dict], rows: list[dict], better: str, than: str) -> list[dict]:
    """At each size both modes have, smallest first: is `better` better than `than`? The paired
    test over seeds and test images, Holm-adjusted over the sizes (one question asked at each),
    with its verdict (metrics.judge, as `transferlab compare` judges its rows)."""
    sizes = {(row["x"], row["images_per_class"]) for row in rows if row["mode"] == better} \
        & {(row["x"], row["images_per_class"]) for row in rows if row["mode"] == than}
    sizes = sorted(sizes, key=lambda pair: pair[0])
    pairs = [(right_at(points, better, size), right_at(points, than, size)) for _, size in sizes]
    return [{"x": x, "images_per_class": size, **test} for (x, size), test in zip(sizes, judge(pairs))]


def dividend(points: list[dict], rows: list[dict]) -> list[dict]:
    """At each size, how many images per class scratch needs to match each transfer mode. A claim
    rests on the paired test against scratch at the size it says falls short (Holm-adjusted over
    the mode's sizes): "more than N" on scratch at the largest size N, "about M" on scratch at the
    largest size below M, none at or below the transfer mode's own size on scratch at that size.
    Where the test does not show the transfer mode better, no dividend is stated."""
    scratch = line(rows, "scratch")
    accuracy = {(row["mode"], row["x"]): row["accuracy"] for row in rows}
    size_at = {row["x"]: row["images_per_class"] for row in rows if row["mode"] == "scratch"}
    result = []
    for mode in TRANSFER_MODES if scratch else ():
        claims = []
        for x, reached in line(rows, mode):
            relation, needed = images_to_reach(scratch, reached)
            below = [sx for sx, _ in scratch if sx < needed]
            anchor = needed if relation == ">" else max(below) if relation == "=" and below else x
            claims.append((x, reached, relation, needed, anchor if anchor in size_at else x))
        pairs = [(right_at(points, mode, size_of(rows, mode, x)), right_at(points, "scratch", size_at[anchor]))
                 for x, _, _, _, anchor in claims if anchor in size_at]
        for (x, reached, relation, needed, anchor), test in zip([c for c in claims if c[4] in size_at], judge(pairs)):
            shown = test["verdict"].startswith("better")
            result.append({"mode": mode, "x": x, "accuracy": reached, "against_scratch_at": anchor,
                           "scratch_accuracy": accuracy["scratch", anchor], "verdict": test["verdict"],
                           "p_adjusted": test["p_adjusted"], "scratch_needs": relation if shown else None,
                           "images": needed if shown else None, "factor": needed / x if shown else None,
                           "says": dividend_sentence(mode, x, reached, relation, needed) if shown
                           else unshown_sentence(mode, x, reached, anchor, accuracy["scratch", anchor], test)})
    return result


def size_of(rows: list[dict], mode: str, x: float):
    return next(row["images_per_class"] for row in rows if row["mode"] == mode and row["x"] == x)


def right_at(points: list[dict], mode: str, size) -> np.ndarray:
    return right_matrix([p for p in points if p["mode"] == mode and p["images_per_class"] == size])


def unshown_sentence(mode: str, x: float, accuracy: float, anchor: float, scratch: float, test: dict) -> str:
    return (f"at {x:g} images per class, {mode} ({accuracy:.1%}) against scratch at {anchor:g} per class "
            f"({scratch:.1%}): {test['verdict']} (p = {test['p_adjusted']:.3g}), so no dividend is measured there")


def dividend_sentence(mode: str, x: float, accuracy: float, relation: str, needed: float) -> str:
    at = f"at {x:g} images per class, {mode} ({accuracy:.1%}) is better than scratch"
    if relation == ">" and needed <= x:
        return f"{at}, which does not reach it with all the {needed:g} per class there are"
    if relation == ">":
        return (f"{at}, which needs more than the {needed:g} per class there are to reach it: ImageNet weights "
                f"are worth more than {needed / x:.1f}x the data")
    if relation == "<=":
        return f"{at} at that size, though scratch's mean reaches it with {needed:g} per class or fewer"
    if needed <= x:
        return f"{at} at that size, though scratch's curve reaches it at about {needed:.0f} per class"
    return (f"{at}, which needs about {needed:.0f} per class to reach it: ImageNet weights are worth about "
            f"{needed / x:.1f}x the data")


def crossover(points: list[dict], rows: list[dict]) -> dict:
    """The smallest size at which finetune beats extract, by the paired test at each size both
    have (Holm-adjusted over the sizes); "never" if no size shows it."""
    tests = size_tests(points, rows, "finetune", "extract")
    if not tests:
        return {"from_images_per_class": None, "says": "no crossover: it needs finetune and extract in curve.modes",
                "tests": []}
    better = [t for t in tests if t["verdict"].startswith("better")]
    says = (f"finetune first beats extract at {better[0]['x']:g} images per class" if better
            else f"a frozen backbone (extract) is enough: finetune never beats it, up to {tests[-1]['x']:g} "
                 f"images per class")
    return {"from_images_per_class": better[0]["x"] if better else None, "says": says, "tests": tests}


def right_matrix(points: list[dict]) -> np.ndarray:
    """(points, test images): 1 where the point's model got the image right (its "right" string)."""
    return np.array([[c == "1" for c in p["right"]] for p in points], dtype=float)


def markdown(rows: list[dict], dividends: list[dict], cross: dict, merged: dict | None = None) -> str:
    """The curve as a table (accuracy and 95% interval per mode and size), then what it says.
    `merged`: sizes that drew every training image, by the size they are the same as."""
    modes = sorted({row["mode"] for row in rows}, key=MODES.index)
    sizes = sorted({(row["x"], row["images_per_class"]) for row in rows}, key=lambda pair: pair[0])
    cell = {(row["mode"], row["images_per_class"]): row for row in rows}
    merged = merged or {}
    lines = ["| images per class | " + " | ".join(modes) + " |", "|---:|" + "---|" * len(modes)]
    for x, size in sizes:
        label = f"{x:g}" if size != "all" else f"all ({x:g})"
        if size == "all" and merged.get("all"):
            label += " = " + ", ".join(str(n) for n in merged["all"])
        cells = [f"{c['accuracy']:.3f} [{c['ci95_low']:.3f}, {c['ci95_high']:.3f}] ({_seeds(len(c['seeds']))})"
                 if (c := cell.get((mode, size))) else "" for mode in modes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Test accuracy, mean over seeds; in brackets the 95% interval over seeds and test images.", ""]
    for same, sizes_merged in merged.items():
        listed = ", ".join(str(n) for n in sizes_merged)
        lines.append(f"- {listed} per class draw every training image (no class has more): the same training as "
                     f"all, which is their row" if same == "all" else
                     f"- {listed} per class draw every training image (no class has more); add all to "
                     f"curve.images_per_class to train that point")
    short = {row["images_per_class"]: row["classes_with_fewer"] for row in rows if row["classes_with_fewer"]}
    lines += [f"- at {size} per class, classes with fewer train on all they have: "
              + ", ".join(f"{label} {n}" for label, n in fewer.items()) for size, fewer in short.items()]
    lines += [f"- {d['says']}" for d in dividends] or ["- no dividend: it needs scratch and finetune or extract "
                                                       "in curve.modes"]
    lines += [f"- {cross['says']}"]
    return "\n".join(lines) + "\n"


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def merge_everything(points: list[dict], sizes: list) -> tuple[list[dict], dict]:
    """Points that train, and the sizes whose points drew every training image (the `all` point's
    training, which they did not repeat): {"all": [sizes]} where all is among `sizes`, else
    {None: [sizes]}."""
    same = sorted({p["images_per_class"] for p in points if p.get("same_as") == "all"})
    trained = [p for p in points if p.get("same_as") != "all"]
    return trained, ({"all" if "all" in sizes else None: same} if same else {})


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
