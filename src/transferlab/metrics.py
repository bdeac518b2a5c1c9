"""Test-set metrics with their uncertainty, and paired comparisons between modes."""
from __future__ import annotations

import math

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
    """The wrongly classified images the model was surest of, surest first (fastai's top losses):
    where mislabeled data shows. Each with its true and predicted class, the confidence in the
    prediction and the loss, -log p(true class)."""
    predicted = probs.argmax(1)
    wrong = np.flatnonzero(predicted != targets)
    order = wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")][:top]
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


ALPHA = 0.05
POWER = 0.8


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict:
    """Is row `a` better than row `b`, as a user asks it: would the ranking hold on re-runs with
    other seeds and on new images from the same source? `a` and `b` are (seeds, images) arrays of
    right/wrong on the same test images, paired on images.

    One seed each: McNemar's exact test, as evaluate uses (one question, one answer). Otherwise the
    gap's variance has three parts, each estimated from the data: the images' (the per-image
    difference of seed-averaged accuracy, over n images) and each row's seed-to-seed spread (the
    variance of its per-seed accuracies, over its seeds; a row of one seed borrows the other's). The
    gap over its standard error is referred to Student's t with Welch-Satterthwaite's degrees of
    freedom, which two or three seeds keep few: the test is honest about what a third seed could do.
    Also returned: about how many seeds per row would detect a gap of this size (80% power), or
    None when the images alone could not (more seeds would not help).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    gap = float(a.mean() - b.mean())
    if len(a) == 1 and len(b) == 1:
        return {"gap": gap, "p_value": mcnemar_p(a[0] > 0, b[0] > 0), "test": "McNemar exact", "seeds_needed": None}
    images = a.shape[1]
    image_term = (a.mean(0) - b.mean(0)).var(ddof=1) / images
    spread = {len(x): x.mean(1).var(ddof=1) for x in (a, b) if len(x) > 1}
    seed_var = [x.mean(1).var(ddof=1) if len(x) > 1 else max(spread.values()) for x in (a, b)]
    seed_terms = [var / len(x) for var, x in zip(seed_var, (a, b))]
    variance = image_term + sum(seed_terms)
    if variance == 0:
        return {"gap": gap, "p_value": 1.0 if gap == 0 else 0.0, "test": "two-level t", "seeds_needed": None}
    parts = [(image_term, images - 1)] + [(term, max(len(x) - 1, 1)) for term, x in zip(seed_terms, (a, b))]
    df = variance ** 2 / sum(term ** 2 / dof for term, dof in parts if term > 0)
    p = float(2 * student_t.sf(abs(gap) / variance ** 0.5, df))
    return {"gap": gap, "p_value": min(1.0, p), "test": "two-level t", "seeds_needed": seeds_needed(
        gap, image_term, seed_var)}


def seeds_needed(gap: float, image_term: float, seed_var: list[float]) -> int | None:
    """Seeds per row at which a gap this size would be found 80% of the time at the 5% level (a
    normal approximation), or None where the test images alone leave too much noise."""
    reach = (abs(gap) / (norm.ppf(1 - ALPHA / 2) + norm.ppf(POWER))) ** 2  # the variance that would do
    if gap == 0 or image_term >= reach:
        return None
    return max(2, math.ceil(sum(seed_var) / (reach - image_term)))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of several p values (scipy has none): each row's verdict against
    the best is one of k-1 comparisons, so the chance of any false "worse" stays at 5%."""
    order = np.argsort(p_values)
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def verdict(gap: float, p: float, seeds: int, needed: int | None) -> str:
    """What a comparison says: a difference; too few runs to tell it (and how many would); or none
    that these test images could show."""
    if p < ALPHA:
        return "better" if gap > 0 else "worse"
    if needed is not None and needed > seeds:
        return f"too few runs to tell ({seeds} seeds; would need about {needed})"
    return "not distinguishable"
