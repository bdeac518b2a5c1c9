"""Do the leaderboard's verdicts mean what they say? Rows simulated from known truths, judged as
`transferlab compare` judges them, and each "not distinguishable" checked by re-running the same
models on the same test images with ten times the seeds.

    python benchmarks/verdicts.py [--pairs 1000] [--boards 400]

First, the test alone, on pairs of rows (the tests' `simulated_rows`: 153 test images of random
difficulty, about 82% right, the same odds for both rows, per-seed random effects of a given
spread, row a better by a given gap on the logit scale): how often it calls them different at
the 5% level, before this change and now; for equal rows that is the false-alarm rate (at most
about 5%), otherwise the power.

Then whole leaderboards (`metrics.judge`: every row against the best, Holm over the rows). A
world: 153 test images, each with a difficulty (a logit) that every model shares, plus a logit of
each model's own (the images one model finds hard and another does not); a seed shifts a run's
logits by a common amount, and each run gets each image right with the logistic of its logit, so
seeds flip the borderline images. A leaderboard: five models whose accuracies over the whole
source (not just these images) are 85% and 85%, 83%, 81% and 77%: gaps of 0, 2, 4 and 8 points.
Printed per world and seeds per row, for the verdicts now and for the previous rule
(normal-approximation seeds_needed at the unadjusted 5% level, the per-image term taken as a
floor, McNemar's one seed each read as "not distinguishable"): how often each verdict appears;
how often two equal rows are called different (should be at most about 5%); and the share of
"not distinguishable" verdicts that ten times the seeds refutes (the gap then found, by the test
now and Holm-adjusted, at the 5% level).
"""
import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.polynomial.hermite_e import hermegauss
from scipy.optimize import brentq
from scipy.special import expit
from scipy.stats import norm
from scipy.stats import t as student_t

from transferlab.metrics import ALPHA, holm, judge, mcnemar_p, paired_difference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_compare import simulated_rows  # noqa: E402 - the tests' simulation, one definition

IMAGES = 153
ACCURACY = (0.85, 0.85, 0.83, 0.81, 0.77)  # over the source: gaps of 0, 0, 2, 4, 8 points to the top
SEEDS = (1, 2, 3)
REPEAT = 10  # a verdict of "not distinguishable" is checked on ten times the seeds
CASES = [(1, 0.0, 0.0), (2, 0.8, 0.0), (3, 0.8, 0.0), (5, 0.3, 0.0), (2, 0.2, 0.8), (3, 0.2, 0.8), (5, 0.2, 0.8)]


@dataclass(frozen=True)
class World:
    name: str
    difficulty: float  # sd of the logit every model shares per image
    own: float         # sd of each model's own logit per image
    seed: float        # sd of a seed's common logit shift


WORLDS = (World("models share their hard images", 6.0, 1.0, 0.3),
          World("each model has hard images of its own", 6.0, 3.0, 0.2),
          World("unstable seeds (sd of a seed's accuracy ~4 points)", 6.0, 1.0, 1.0))


def offset(world: World, accuracy: float) -> float:
    """The mean logit at which a model's accuracy over the whole source is `accuracy`."""
    nodes, weights = hermegauss(80)
    sd = math.hypot(world.difficulty, world.own, world.seed)
    return brentq(lambda c: weights @ expit(c + sd * nodes) / weights.sum() - accuracy, -50, 50)


def models(world: World, rng: np.random.Generator) -> np.ndarray:
    """(models, images): each model's logit per test image, before a seed's shift."""
    shared = rng.normal(0, world.difficulty, IMAGES)
    return np.stack([offset(world, a) + shared + rng.normal(0, world.own, IMAGES) for a in ACCURACY])


def runs(logits: np.ndarray, world: World, seeds: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Each model trained `seeds` times: (seeds, images) right/wrong."""
    shifted = logits[:, None, :] + rng.normal(0, world.seed, (len(logits), seeds, 1))
    return list(rng.random(shifted.shape) < expit(shifted))


def board(rows: list[np.ndarray], best: int | None = None) -> tuple[int, dict[int, dict]]:
    """The leaderboard's best row and each other row's judgement against it."""
    best = int(np.argmax([r.mean() for r in rows])) if best is None else best
    others = [i for i in range(len(rows)) if i != best]
    return best, dict(zip(others, judge([(rows[i], rows[best]) for i in others])))


def previous(rows: list[np.ndarray], best: int) -> dict[int, str]:
    """The rule before this benchmark's change, for comparison: its verdict kind per row."""
    tests = {i: _previous_test(r.astype(float), rows[best].astype(float)) for i, r in enumerate(rows) if i != best}
    kinds = {}
    for (i, (gap, p, needed)), adjusted in zip(tests.items(), holm([t[1] for t in tests.values()])):
        seeds = min(len(rows[i]), len(rows[best]))
        kinds[i] = ("different" if adjusted < ALPHA else "too few" if needed is not None and needed > seeds
                    else "not distinguishable")
    return kinds


def _previous_test(a: np.ndarray, b: np.ndarray) -> tuple[float, float, int | None]:
    gap, images = a.mean() - b.mean(), a.shape[1]
    if len(a) == 1 and len(b) == 1:
        return gap, mcnemar_p(a[0] > 0, b[0] > 0), None
    image_term = (a.mean(0) - b.mean(0)).var(ddof=1) / images
    spread = [x.mean(1).var(ddof=1) for x in (a, b) if len(x) > 1]
    seed_var = [x.mean(1).var(ddof=1) if len(x) > 1 else max(spread) for x in (a, b)]
    terms = [image_term] + [v / len(x) for v, x in zip(seed_var, (a, b))]
    variance = sum(terms)
    if variance == 0:
        return gap, 1.0 if gap == 0 else 0.0, None
    dofs = [images - 1] + [max(len(x) - 1, 1) for x in (a, b)]
    dof = variance ** 2 / sum(t ** 2 / d for t, d in zip(terms, dofs) if t > 0)
    p = float(2 * student_t.sf(abs(gap) / variance ** 0.5, dof))
    reach = (abs(gap) / (norm.ppf(1 - ALPHA / 2) + norm.ppf(0.8))) ** 2
    needed = None if gap == 0 or image_term >= reach else max(2, math.ceil(sum(seed_var) / (reach - image_term)))
    return gap, p, needed


def kind(verdict: str) -> str:
    return "different" if verdict in ("better", "worse") else "too few" if verdict.startswith("too few") else verdict


def simulate(world: World, seeds: int, boards: int, rng: np.random.Generator) -> dict:
    """Tallies over `boards` leaderboards of `seeds` seeds per row."""
    tally = {rule: {"verdicts": {}, "equal": [0, 0], "nd": [0, 0]} for rule in ("now", "before")}
    by_gap: dict[int, dict[str, int]] = {}
    for _ in range(boards):
        logits = models(world, rng)
        rows = runs(logits, world, seeds, rng)
        best, judged = board(rows)
        kinds = {"now": {i: kind(j["verdict"]) for i, j in judged.items()}, "before": previous(rows, best)}
        refuted = None
        if any(k == "not distinguishable" for found in kinds.values() for k in found.values()):
            _, again = board(runs(logits, world, REPEAT * seeds, rng), best)
            refuted = {i: j["p_adjusted"] < ALPHA for i, j in again.items()}
        for rule, found in kinds.items():
            for i, k in found.items():
                counts = tally[rule]
                counts["verdicts"][k] = counts["verdicts"].get(k, 0) + 1
                if ACCURACY[i] == ACCURACY[best]:
                    counts["equal"][0] += k == "different"
                    counts["equal"][1] += 1
                if k == "not distinguishable":
                    counts["nd"][0] += refuted[i]
                    counts["nd"][1] += 1
                if rule == "now":
                    gap = round(100 * abs(ACCURACY[i] - ACCURACY[best]))
                    by_gap.setdefault(gap, {}).setdefault(k, 0)
                    by_gap[gap][k] += 1
    return {"tally": tally, "by_gap": by_gap}


def share(pair: list[int]) -> str:
    return f"{pair[0] / pair[1]:.1%} ({pair[0]}/{pair[1]})" if pair[1] else "-"


def calibration(pairs: int, rng: np.random.Generator) -> None:
    """The test alone on pairs of rows: how often it calls them different, before and now."""
    print("| seeds per row | seed spread (logit sd) | true gap (logit) | mean gap, points "
          "| called different: before | now |")
    print("|---|---|---|---|---|---|")
    for seeds, spread, gap in CASES:
        before = now = 0
        gaps = []
        for _ in range(pairs):
            a, b = simulated_rows(rng, seeds, gap=gap, seed_sd=spread)
            gaps.append(a.mean() - b.mean())
            before += _previous_test(a.astype(float), b.astype(float))[1] < ALPHA
            now += paired_difference(a, b)["p_value"] < ALPHA
        print(f"| {seeds} | {spread} | {gap} | {100 * np.mean(gaps):.1f} | {before / pairs:.1%} | {now / pairs:.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1000, help="pairs of rows per line of the test's calibration")
    parser.add_argument("--boards", type=int, default=400, help="leaderboards per world and seeds per row")
    args = parser.parse_args()
    rng, started = np.random.default_rng(0), time.perf_counter()
    calibration(args.pairs, rng)
    print(f"\n{time.perf_counter() - started:.0f} s for {len(CASES) * args.pairs} pairs\n")
    started = time.perf_counter()
    kinds = ("different", "too few", "not distinguishable")
    print("| world | seeds per row | rule | different / too few / not distinguishable | equal rows called "
          "different | \"not distinguishable\" refuted by 10x seeds |")
    print("|---|---|---|---|---|---|")
    gaps = []
    for world in WORLDS:
        for seeds in SEEDS:
            result = simulate(world, seeds, args.boards, rng)
            for rule, counts in result["tally"].items():
                total = sum(counts["verdicts"].values())
                shares = " / ".join(f"{counts['verdicts'].get(k, 0) / total:.0%}" for k in kinds)
                print(f"| {world.name} | {seeds} | {rule} | {shares} | {share(counts['equal'])} | "
                      f"{share(counts['nd'])} |")
            gaps.append((world.name, seeds, result["by_gap"]))
    print("\nVerdicts now by the true gap between a row and the best (points over the source):\n")
    print("| world | seeds per row | true gap | different / too few / not distinguishable | pairs |")
    print("|---|---|---|---|---|")
    for name, seeds, by_gap in gaps:
        for gap, counts in sorted(by_gap.items()):
            total = sum(counts.values())
            print(f"| {name} | {seeds} | {gap} | " + " / ".join(f"{counts.get(k, 0) / total:.0%}" for k in kinds)
                  + f" | {total} |")
    print(f"\n{time.perf_counter() - started:.0f} s for {len(WORLDS) * len(SEEDS) * args.boards} leaderboards")


if __name__ == "__main__":
    main()
