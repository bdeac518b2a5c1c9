"""Are the leaderboard's verdicts calibrated? Simulated pairs of rows from known truths, the
verdict's test before (a sign-flip test over images on seed-averaged accuracy, blind to the
seed-to-seed spread) and now (`metrics.paired_difference`).

    python benchmarks/verdicts.py [--pairs 1000]

Each pair: 153 test images of random difficulty (about 82% right on average), per-seed random
effects of a given spread, row a better by a given gap (logit scale; 0 = equally good). Prints how
often each test calls the rows different at the 5% level: for equal rows that is the false-alarm
rate (should be at most about 5%), otherwise the power.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

from transferlab.metrics import paired_difference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_compare import simulated_rows  # noqa: E402 - the tests' simulation, one definition

CASES = [(1, 0.0, 0.0), (2, 0.8, 0.0), (3, 0.8, 0.0), (5, 0.3, 0.0), (2, 0.2, 0.8), (3, 0.2, 0.8), (5, 0.2, 0.8)]


def sign_flip_p(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, draws: int = 2000) -> float:
    """The previous verdict: sign flips of per-image differences of seed-averaged accuracy."""
    diff = a.mean(0) - b.mean(0)
    observed = abs(diff.mean())
    if observed == 0:
        return 1.0
    signs = rng.choice([-1.0, 1.0], size=(draws, len(diff)))
    return (int((np.abs(signs @ diff) / len(diff) >= observed - 1e-12).sum()) + 1) / (draws + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| seeds per row | seed spread (logit sd) | true gap (logit) | mean gap, points "
          "| called different: before | now |")
    print("|---|---|---|---|---|---|")
    for seeds, spread, gap in CASES:
        before = now = 0
        gaps = []
        for _ in range(args.pairs):
            a, b = simulated_rows(rng, seeds, gap=gap, seed_sd=spread)
            gaps.append(a.mean() - b.mean())
            before += sign_flip_p(a.astype(float), b.astype(float), rng) < 0.05
            now += paired_difference(a, b)["p_value"] < 0.05
        print(f"| {seeds} | {spread} | {gap} | {100 * np.mean(gaps):.1f} | {before / args.pairs:.1%} | "
              f"{now / args.pairs:.1%} |")


if __name__ == "__main__":
    main()
