"""A learning curve's point: which training images it takes. Only what a point runs lives here
(the summary's tables and tests are in curves.py), so that a change to the summary re-runs the
summary alone.

A point trains one mode on a nested, seeded subset of the training split and scores it on the
whole test split; val and test are the same at every point. Its training budget is a number of
optimizer steps, not of epochs (BiT's rule for small datasets is a fixed number of steps): each
epoch takes as many images as an epoch of all the training images, so the subset is seen several
times an epoch, and every point is validated `epochs` times. With fixed epochs (`budget: epochs`)
a point of 2 images per class would take a tenth of the steps of one of 20.
"""
from __future__ import annotations

import random

from transferlab.images import Sample
from transferlab.subsets import per_class_subset


def training_rows(train: list[Sample], per_class: int | None, seed: int, budget: str) -> tuple[list[int], dict]:
    """Indices into `train` that one epoch of a point takes, and what the subset drew.

    budget "steps": the subset of `per_class` images per class, repeated (the remainder drawn with
    `seed`) to as many rows as `train` has: the same optimizer steps per epoch at every size.
    budget "epochs": the subset once. `drawn["everything"]` says whether the subset is the whole
    of `train`: a size at least every class's count is then the `all` point itself.
    """
    subset, drawn = per_class_subset(train, per_class, seed)
    drawn = {**drawn, "everything": len(subset) == len(train)}
    index = {s.path: i for i, s in enumerate(train)}
    rows = [index[s.path] for s in subset]
    if budget == "epochs":
        return rows, {**drawn, "passes_per_epoch": 1}
    passes, rest = divmod(len(train), len(rows))
    extra = random.Random(seed).sample(rows, rest)
    return rows * passes + extra, {**drawn, "passes_per_epoch": round(len(train) / len(rows), 3)}
