"""Nested, seeded subsets of a training split, per class: the split stage's `train_per_class`
and a learning curve's points draw them alike. Its own module, so that a curve's points depend
on it and not on the split's near-copy check."""
from __future__ import annotations

import random
from collections import Counter, defaultdict

from transferlab.images import Sample


def per_class_subset(samples: list[Sample], per_class: int | None, seed: int) -> tuple[list[Sample], dict]:
    """At most `per_class` images of each class (None: all), drawn with `seed`, and what was drawn.

    Each class's images are shuffled once by a generator seeded with (seed, class) and the first
    `per_class` taken, so subsets are nested: those of 5 are among those of 10, for any seed. A
    class with fewer images gives all it has, and the returned summary names it.
    """
    by_class = defaultdict(list)
    for sample in sorted_by_path(samples):
        by_class[sample.label].append(sample)
    subset, short = [], {}
    for label, rows in sorted(by_class.items()):
        random.Random(f"{seed}:{label}").shuffle(rows)
        if per_class is not None and len(rows) < per_class:
            short[label] = len(rows)
        subset += rows[:per_class]
    counts = Counter(s.label for s in subset)
    return sorted_by_path(subset), {"requested": "all" if per_class is None else per_class, "seed": seed,
                             "counts": dict(sorted(counts.items())), "classes_with_fewer": short}


def sorted_by_path(rows: list[Sample]) -> list[Sample]:
    return sorted(rows, key=lambda s: s.path)
