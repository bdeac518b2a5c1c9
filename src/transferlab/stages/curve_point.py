"""curve point: one point of the learning curve (curves/dvc.yaml runs it from the project root).

    python -m transferlab.stages.curve_point N MODE SEED  -> curves/points/MODE-N-sSEED.json

Trains MODE on N training images per class (all: every one), drawn with SEED, for the budget
curves/params.yaml names, and scores it on the test split as evaluate does. It keeps no
checkpoint: what a curve needs of it is which test images it got right. A size at least every
class's count draws every training image: that is the `all` point's training, so the point only
says so and trains nothing.
"""
import sys
import time
from pathlib import Path

from transferlab.curve_point import training_rows
from transferlab.data import read_splits
from transferlab.distributed import World, use_least_used_gpu
from transferlab.files import write_json
from transferlab.images import samples_digest
from transferlab.models import MODES
from transferlab.params import load_curve_params, load_params, to_dict
from transferlab.scoring import predict_split, scoring_hardware
from transferlab.stages import RESUME_DIR, cache_dir, require_inputs, run_stage
from transferlab.training import Subset, train_mode

SPLIT_DIR = Path("data/split")
CURVE_PARAMS = Path("curves/params.yaml")
POINTS_DIR = Path("curves/points")
# Every seed's extract points share one embedding pass, cropped with this seed: a fixed one, so
# that params.yaml's `seed` (the main pipeline's) re-runs no point of the curve.
EMBED_SEED = 0


def point_path(mode: str, size, seed: int) -> Path:
    return POINTS_DIR / f"{mode}-{size}-s{seed}.json"


def point(size: str, mode: str, seed: int) -> None:
    """Train and score one point of the curve."""
    start = time.perf_counter()
    require_inputs({str(SPLIT_DIR / f"{name}.csv"): "split" for name in ("train", "val", "test")})
    params, budget = load_params(), load_curve_params(CURVE_PARAMS).budget
    samples = read_splits(SPLIT_DIR)
    # The split report's classes, from the CSVs themselves: the report (skipped files, near-copies)
    # may change while the images stay the same, and re-runs no point.
    classes = sorted({s.label for split in samples.values() for s in split})
    rows, drawn = training_rows(samples["train"], None if size == "all" else int(size), seed, budget)
    record = {"model": params.model, "mode": mode, "images_per_class": size if size == "all" else int(size),
              "seed": seed, "drawn": drawn, "budget": budget, "test_images": samples_digest(samples["test"])}
    if size != "all" and drawn["everything"]:
        write_json(point_path(mode, size, seed), {**record, "same_as": "all"})
        print(f"{mode}, {size} images per class, seed {seed}: every class has at most {size} training images, so "
              f"this is the `all` point's training; not repeated")
        return
    train = params.for_mode(mode)
    identity = [params.model, params.weights, EMBED_SEED, seed, to_dict(train), rows,
                samples_digest(samples["train"] + samples["val"])]
    world = World(local_rank=use_least_used_gpu(train.device, cache_dir() / "gpus"))  # queued curves spread
    trained = train_mode(params.model, mode, train, seed, classes, samples, SPLIT_DIR, cache_dir(),
                         (RESUME_DIR, f"curve-{mode}-{size}-s{seed}", identity), world,
                         subset=Subset(rows, embed_seed=EMBED_SEED), weights=params.weights)
    built, result, hw = trained.built, trained.result, trained.hw
    fit_seconds = sum(r["train_seconds"] + r["val_seconds"] for r in result.history)  # the epochs themselves
    test_start = time.perf_counter()
    predictions, eval_hw = predict_split(built.model, built.arch, built.preprocess, classes, samples["test"],
                                         trained.source, params.evaluate.batch_size,
                                         scoring_hardware(params.evaluate), cache_dir(),
                                         desc=f"test {mode} {size}/class", views=params.evaluate.tta)
    right = predictions.probs.argmax(1) == predictions.targets
    write_json(point_path(mode, size, seed), {
        **record, "epochs": len(result.history), "steps_per_epoch": trained.steps_per_epoch,
        "best_epoch": result.best_epoch, "best_val_accuracy": result.best_val.accuracy,
        "accuracy": float(right.mean()), "right": "".join("1" if r else "0" for r in right),
        "seconds": {"fit": fit_seconds, "test": time.perf_counter() - test_start,
                    "after_imports": time.perf_counter() - start},
        "hardware": hw.describe(), "evaluate_hardware": eval_hw.describe()})
    if trained.resume_path is not None:
        trained.resume_path.unlink()  # finished: the next run of this point starts afresh
    print(f"{mode}, {size} images per class, seed {seed}: test accuracy {right.mean():.4f} ({len(rows)} images an "
          f"epoch; {fit_seconds:.1f} s training)")


def main() -> None:
    if len(sys.argv) != 4 or sys.argv[2] not in MODES:
        sys.exit(f"usage: python -m transferlab.stages.curve_point N {{{','.join(MODES)}}} SEED")
    size, mode, seed = sys.argv[1:]
    if size != "all" and not (size.isdigit() and int(size) > 0):
        sys.exit(f"curve point: images per class is {size!r}; give a whole number above 0, or all")
    run_stage("curve point", lambda: point(size, mode, int(seed)), [str(point_path(mode, size, seed))])


if __name__ == "__main__":
    main()
