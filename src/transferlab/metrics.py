"""Test-set metrics with their uncertainty, and paired comparisons between modes."""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import binomtest
from sklearn import metrics as skm


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of a proportion; unlike the normal one it stays in [0, 1] near 100%."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


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
    result["confusion"] = {f"true_{t}": {f"pred_{p}": int(confusion[i, j]) for j, p in enumerate(classes)}
                           for i, t in enumerate(classes)}
    return result


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
