"""Test-set metrics with their uncertainty; paired comparisons between runs, modes and rows of
seeds on the same test images, and the verdicts those comparisons can honestly give (`judge`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest, norm
from scipy.stats import t as student_t
from sklearn import metrics as skm


def wilson_interval(correct: int, total: int) -> tuple[float, float]:
    """95% Wilson interval of a proportion (scipy's); unlike the normal one it stays in [0, 1],
    and is exactly 0 or 1 at 0/n and n/n."""
    if total == 0:
        return 0.0, 1.0
    interval = binomtest(correct, total).proportion_ci(confidence_level=0.95, method="wilson")
    p = correct / total
    return max(0.0, min(p, float(interval.low))), min(1.0, max(p, float(interval.high)))


# What metrics/eval.json keeps per mode, for `dvc metrics show` / `dvc exp show` at a glance; the
# rest (per-class detail, whose size grows with the number of classes) goes to reports/eval.json.
HEADLINE = ("accuracy", "accuracy_ci95_low", "accuracy_ci95_high", "balanced_accuracy", "roc_auc")


def headline(metrics: dict) -> dict:
    return {key: metrics[key] for key in HEADLINE if key in metrics}


def classification_metrics(targets: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Flat-ish dict of test metrics for one model, as dvc metrics shows them."""
    preds = probs.argmax(1)
    labels = list(range(len(classes)))
    correct = int((preds == targets).sum())
    low, high = wilson_interval(correct, len(targets))
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        targets, preds, labels=labels, average="macro", zero_division=0)
    per_class_recall = skm.recall_score(targets, preds, labels=labels, average=None, zero_division=0)
    confusion = skm.confusion_matrix(targets, preds, labels=labels)
    result = {
        "accuracy": correct / len(targets),
        "accuracy_ci95_low": low,
        "accuracy_ci95_high": high,
        "correct": correct,
        "images": len(targets),
        "balanced_accuracy": float(skm.balanced_accuracy_score(targets, preds)),
        "precision_macro": float(precision),
        "recall_macro": float(recall),
        "f1_macro": float(f1),
        "log_loss": float(skm.log_loss(targets, probs, labels=labels)),
    }
    if len(np.unique(targets)) == len(classes):  # AUC is undefined when a class is absent
        scores = probs[:, 1] if len(classes) == 2 else probs
        result["roc_auc"] = float(skm.roc_auc_score(targets, scores, multi_class="ovr", labels=labels))
    result["recall_per_class"] = {name: float(r) for name, r in zip(classes, per_class_recall)}
    result["most_confused"] = most_confused(confusion, classes)
    result["confusion"] = confusion.tolist()  # rows: true class, columns: predicted, in `classes` order
    return result


def most_confused(confusion: np.ndarray, classes: list[str], top: int = 10) -> list[dict]:
    """The class pairs most often mistaken for one another (true -> predicted), most frequent first."""
    off_diagonal = confusion.copy()
    np.fill_diagonal(off_diagonal, 0)
    pairs = [(int(off_diagonal[i, j]), i, j) for i, j in zip(*np.nonzero(off_diagonal))]
    pairs.sort(key=lambda pair: (-pair[0], pair[1], pair[2]))
    return [{"true": classes[i], "predicted": classes[j], "images": n} for n, i, j in pairs[:top]]


def mcnemar_p(right_a: np.ndarray, right_b: np.ndarray) -> float:
    """Exact McNemar test: could two models that are right on the same test images differ by chance?"""
    only_a = int((right_a & ~right_b).sum())
    only_b = int((~right_a & right_b).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def compare(right: dict[str, np.ndarray], first: str, second: str) -> dict:
    """Accuracy gain of `first` over `second` on the same images, and whether it is real."""
    a, b = right[first], right[second]
    p = mcnemar_p(a, b)
    return {"accuracy_gain": float(a.mean() - b.mean()), "mcnemar_p": p, "significant": p < 0.05,
            f"only_{first}_right": int((a & ~b).sum()), f"only_{second}_right": int((~a & b).sum())}


def top_losses(probs: np.ndarray, targets: np.ndarray, paths: list[str], classes: list[str],
               top: int = 16) -> list[dict]:
    """The wrongly classified images with the largest loss, -log p(true class), largest first
    (fastai's top losses, mistakes only): where mislabeled data shows. Each with its true and
    predicted class, the confidence in the prediction and the loss. With three classes or more the
    order is not that of the confidence: a mistake 50% sure of a wrong class can give the true one
    5%, a worse loss than one 80% sure that gives it 20%."""
    predicted = probs.argmax(1)
    wrong = np.flatnonzero(predicted != targets)
    order = wrong[np.argsort(probs[wrong, targets[wrong]], kind="stable")][:top]  # least p(true): most loss
    return [{"path": paths[i], "true": classes[targets[i]], "predicted": classes[predicted[i]],
             "confidence": round(float(probs[i, predicted[i]]), 4),
             "loss": round(float(-np.log(max(probs[i, targets[i]], 1e-12))), 4)} for i in order]


def bootstrap_interval(right: np.ndarray, rng: np.random.Generator, draws: int = 2000) -> tuple[float, float]:
    """95% interval of mean accuracy, resampling seeds, then test images (right: seeds x images)."""
    seeds, images = right.shape
    means = []
    for start in range(0, draws, 200):  # 200 draws at a time: memory stays small at 10,000 images
        n = min(200, draws - start)
        per_image = right[rng.integers(0, seeds, (n, seeds))].mean(1)  # (n, images)
        picked = np.take_along_axis(per_image, rng.integers(0, images, (n, images)), 1)
        means.append(picked.mean(1))
    low, high = np.quantile(np.concatenate(means), [0.025, 0.975])
    return float(low), float(high)


ALPHA = 0.05        # a verdict's level, after Holm's adjustment
POWER = 0.8         # "would need about N": N seeds per row find a gap of the size seen 80% of the time
BOUND = 0.9         # "not distinguishable" holds for one-sided 90% bounds (the gap's, the floor's)
MOST_SEEDS = 1000   # seeds_needed looks no further


@dataclass(frozen=True)
class Noise:
    """Where the noise in the accuracy gap between two rows comes from, estimated from their runs
    (variances of accuracy; per row, a pair for rows a and b):

    floor: the between-image part, over the n test images: what new test images would move and
        no number of seeds lowers; floor_sd: the standard error of that estimate;
    per_seed: the variance of one seed's accuracy (its images' flips and any shift common to
        them): a row of k seeds adds per_seed / k;
    measured_on: the seeds each per_seed was measured on (a row of one seed borrows the other's);
    scale: per_seed's degrees of freedom per seed past the first: 1, or images - 1 where the
        flips set it (`row_noise`).
    """
    images: int
    seeds: tuple[int, int]
    floor: float
    floor_sd: float
    per_seed: tuple[float, float]
    measured_on: tuple[int, int]
    scale: tuple[int, int]
    borrowed: bool = False  # a row of one seed took the other's estimate: one estimate, counted once

    def parts(self, seeds=None, seeds_only: bool = False) -> list[tuple]:
        """(variance, degrees of freedom) of each row's seed part of the gap's variance, now or at
        `seeds` per row (an array of counts; a row keeps the seeds it has when it has more).
        seeds_only: the degrees of freedom of the seeds alone, even where the flips set per_seed:
        flips bound a seed's spread from below and say nothing of a shift common to the images."""
        scale = (1, 1) if seeds_only else self.scale
        if seeds is None:
            counts, measured = self.seeds, self.measured_on
        else:
            counts = measured = [np.maximum(seeds, k) for k in self.seeds]
        parts = [(v / k, (m - 1) * unit) for v, k, m, unit in zip(self.per_seed, counts, measured, scale)]
        if self.borrowed:  # both terms are one estimate: its degrees of freedom are the lender's, once
            return [(parts[0][0] + parts[1][0], np.maximum(parts[0][1], parts[1][1]))]
        return parts

    def variance(self, seeds=None, floor: bool = True):
        """The gap's variance; without the floor, the part that seeds shrink."""
        return (self.floor if floor else 0.0) + sum(term for term, _ in self.parts(seeds))

    def dof(self, seeds=None, floor: bool = True, seeds_only: bool = False):
        """Welch-Satterthwaite's degrees of freedom of that variance (each part over its own)."""
        parts = ([(self.floor, self.images - 1)] if floor else []) + self.parts(seeds, seeds_only)
        spread = sum(term ** 2 / dof for term, dof in parts)
        return np.where(spread > 0, self.variance(seeds, floor) ** 2 / np.where(spread > 0, spread, 1), np.inf)


def row_noise(right: np.ndarray) -> tuple[float, float, int] | None:
    """One row's (flips, per-seed variance, its degrees of freedom per seed past the first), from
    its (seeds, images) array; None for one seed, whose spread nothing shows.

    flips: the per-image seed variance (an image right with one seed, wrong with another): the
    residual mean square of a two-way analysis of variance, seeds by images. The per-seed
    variance is that of the seeds' accuracies, but never less than flips / images: two seeds can
    tie on accuracy while disagreeing on ten images (the flips then set it, on many more degrees
    of freedom)."""
    seeds, images = right.shape
    if seeds == 1:
        return None
    per_seed = right.mean(1)
    residual = right - right.mean(0) - per_seed[:, None] + right.mean()
    flips = float((residual ** 2).sum()) / ((seeds - 1) * (images - 1))
    spread = float(per_seed.var(ddof=1))
    return (flips, spread, 1) if spread >= flips / images else (flips, flips / images, images - 1)


def noise(a: np.ndarray, b: np.ndarray) -> Noise:
    """The parts of the gap's variance between rows a and b, (seeds, images) each, paired on
    images. The variance of the per-image differences of seed-averaged accuracy holds each row's
    flips over its seeds, which more seeds shrink; only the rest is the floor. A row of one seed
    borrows the other's flips and spread, with their degrees of freedom."""
    measured = [row_noise(x) for x in (a, b)]
    (fa, va, ua), (fb, vb, ub) = [m or next(o for o in measured if o) for m in measured]
    images, seeds = a.shape[1], (len(a), len(b))
    measured_on = (seeds[0] if measured[0] else seeds[1], seeds[1] if measured[1] else seeds[0])
    spread = float((a.mean(0) - b.mean(0)).var(ddof=1))
    floor = max(0.0, spread - fa / seeds[0] - fb / seeds[1])
    # A mean square on d degrees of freedom has variance 2 M^2 / d; the floor is a difference of three.
    flip_terms = [(f / k, (m - 1) * (images - 1)) for f, k, m in zip((fa, fb), seeds, measured_on)]
    borrowed = None in measured
    if borrowed:  # one estimate of the flips, not two independent ones
        flip_terms = [(flip_terms[0][0] + flip_terms[1][0], max(flip_terms[0][1], flip_terms[1][1]))]
    squares = [(spread, images - 1)] + flip_terms
    floor_sd = sum(2 * m ** 2 / d for m, d in squares) ** 0.5
    return Noise(images, seeds, floor / images, floor_sd / images, (va, vb), measured_on, (ua, ub), borrowed)


def undetectable_below(found: Noise, factor: int = 1) -> float:
    """A gap smaller than this no number of seeds could show on these test images: the seeds' part
    gone, the floor alone, at the level this row faces (Holm's factor). The floor is taken at its
    one-sided BOUND lower limit, so that a floor that few seeds overestimate hides nothing."""
    low = max(0.0, found.floor - float(norm.ppf(BOUND)) * found.floor_sd)
    return float(student_t.ppf(1 - ALPHA / (2 * factor), found.images - 1)) * low ** 0.5


def gap_bound(gap: float, found: Noise, seeds=None):
    """The largest gap on these test images that the runs allow (one-sided, BOUND): the gap seen
    plus what the seeds' noise could hide, on t with the degrees of freedom of the seeds alone."""
    seed_part = found.variance(seeds, floor=False)
    quantile = student_t.ppf(BOUND, found.dof(seeds, floor=False, seeds_only=True))
    return abs(gap) + np.where(seed_part > 0, quantile, 0.0) * seed_part ** 0.5


def seeds_needed(gap: float, found: Noise, factor: int = 1) -> int | None:
    """Seeds per row that would tell, if the gap is the one these runs saw; None when these runs
    already do: both rows have two seeds or more, and even the largest gap they allow is below
    what any number of seeds could show (`undetectable_below`). Past that line, the seeds at
    which the test finds a gap this size 80% of the time (t with their degrees of freedom, at
    this row's Holm level); short of it, the seeds at which the bound would fall under it. Past
    MOST_SEEDS: MOST_SEEDS + 1."""
    line = undetectable_below(found, factor)
    if min(found.seeds) > 1 and gap_bound(gap, found) <= line:
        return None
    seeds = np.arange(min(found.seeds) + 1, MOST_SEEDS + 1)
    if abs(gap) > line:
        dof = found.dof(seeds)
        critical = student_t.ppf(1 - ALPHA / (2 * factor), dof) + student_t.ppf(POWER, dof)
        enough = abs(gap) >= critical * found.variance(seeds) ** 0.5
    else:
        enough = gap_bound(gap, found, seeds) <= line
    return int(seeds[enough][0]) if enough.any() else MOST_SEEDS + 1


def paired_difference(a: np.ndarray, b: np.ndarray, factor: int = 1) -> dict:
    """Is row `a` better than row `b`, as a user asks it: would the ranking hold on re-runs with
    other seeds and on new images from the same source? `a` and `b` are (seeds, images) arrays of
    right/wrong on the same test images, paired on images; `factor` is the Holm factor this
    comparison faces (`judge` finds it), which seeds_needed uses.

    One seed each: McNemar's exact test, as evaluate uses (one question, one answer), and no
    seeds_needed: the seed-to-seed spread is unmeasured. Otherwise the gap's variance is the
    images' floor plus each row's per-seed variance over its seeds, each estimated from the runs
    (`noise`; a row of one seed borrows the other's, with its degrees of freedom). The gap over
    its standard error is referred to Student's t with Welch-Satterthwaite's degrees of freedom,
    which a spread measured on two or three seeds keeps few. Also returned: seeds_needed (None
    when these runs show that no number of seeds would tell the rows apart on these test
    images), the gap below which none could (`undetectable_below`) and the largest gap the runs
    allow (`gap_bound`).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    gap, seeds = float(a.mean() - b.mean()), min(len(a), len(b))
    if len(a) == 1 and len(b) == 1:
        return {"gap": gap, "p_value": mcnemar_p(a[0] > 0, b[0] > 0), "test": "McNemar exact", "seeds": 1,
                "seeds_needed": None}
    found = noise(a, b)
    variance = found.variance()
    if variance == 0:
        p = 1.0 if gap == 0 else 0.0
    else:
        p = min(1.0, float(2 * student_t.sf(abs(gap) / variance ** 0.5, found.dof())))
    return {"gap": gap, "p_value": p, "test": "two-level t", "seeds": seeds,
            "seeds_needed": seeds_needed(gap, found, factor),
            "undetectable_below": undetectable_below(found, factor), "gap_bound": float(gap_bound(gap, found))}


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of several p values (scipy has none): each row's verdict against
    the best is one of k-1 comparisons, so the chance of any false "worse" stays at 5%."""
    order = np.argsort(p_values)
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def holm_factors(p_values: list[float]) -> list[int]:
    """What Holm multiplies each p value by: k for the smallest of k, down to 1 for the largest."""
    factors = [0] * len(p_values)
    for rank, i in enumerate(np.argsort(p_values)):
        factors[i] = len(p_values) - rank
    return factors


def judge(pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[dict]:
    """Several comparisons asked together (rows against the best, sizes of a learning curve): each
    pair's paired_difference, its p Holm-adjusted over the pairs (`p_adjusted`), its seeds_needed
    at the level Holm made it face, and its verdict."""
    raw = [paired_difference(a, b) for a, b in pairs]
    p_values = [test["p_value"] for test in raw]
    judged = []
    for (a, b), test, factor, p in zip(pairs, raw, holm_factors(p_values), holm(p_values)):
        test = paired_difference(a, b, factor) if factor > 1 and test["test"] != "McNemar exact" else test
        judged.append({**test, "p_adjusted": p, "holm_factor": factor,
                       "verdict": verdict(test["gap"], p, test["seeds"], test["seeds_needed"])})
    return judged


def verdict(gap: float, p: float, seeds: int, needed: int | None) -> str:
    """What a comparison says, given its (adjusted) p, the fewer seeds of its two rows, and
    paired_difference's seeds_needed:

    - "better" / "worse": p < ALPHA; with one seed each, "better on these runs (...)": McNemar
      shows that these two runs differ, and nothing measured whether re-runs would;
    - "too few runs to tell (1 seed each; ...)": one seed each and no difference: nothing measured
      the seed-to-seed spread, so nothing says whether more seeds would show one;
    - "not distinguishable": seeds_needed is None: even the largest gap these runs allow (the
      gap's one-sided 90% bound) is smaller than any gap that any number of seeds could show on
      these test images (the between-image floor alone hides it);
    - "too few runs to tell (N seeds; would need about M per row)" otherwise, M being the seeds
      per row that would tell if the gap is what these runs saw.
    """
    if p < ALPHA:
        word = "better" if gap > 0 else "worse"
        # One run each: McNemar shows these two runs differ, not that re-runs would rank them alike.
        return word if seeds > 1 else f"{word} on these runs (1 seed each; the seed-to-seed spread is unmeasured)"
    if needed is None and seeds == 1:
        return "too few runs to tell (1 seed each; the seed-to-seed spread is unmeasured)"
    if needed is None:
        return "not distinguishable"
    many = f"over {MOST_SEEDS}" if needed > MOST_SEEDS else f"about {needed}"
    return f"too few runs to tell ({seeds} seed{'s' if seeds != 1 else ''}; would need {many} per row)"
