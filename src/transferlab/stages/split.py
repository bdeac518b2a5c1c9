"""split: data/raw/ -> data/split/{train,val,test}.csv and data/split/report.json."""
from pathlib import Path

from transferlab.files import atomic_dir, signals_deferred, write_json
from transferlab.images import write_split
from transferlab.params import load_params
from transferlab.splits import make_splits
from transferlab.stages import cache_dir, require_inputs, run_stage

RAW_DIR = Path("data/raw")
SPLIT_DIR = Path("data/split")


def main() -> None:
    require_inputs({str(RAW_DIR): "fetch"})
    params = load_params(check_model=False)  # builds no model: starts without torchvision
    split = params.split
    near = None if split.near_duplicate_distance == "off" else split.near_duplicate_distance
    per_class = None if split.train_per_class == "all" else split.train_per_class
    splits, report = make_splits(RAW_DIR, split.val_fraction, split.test_fraction, params.seed, split.test_seed,
                                 near, cache_dir(), per_class)
    with signals_deferred(), atomic_dir(SPLIT_DIR) as out:  # the four files replaced together
        for name, samples in splits.items():
            write_split(out / f"{name}.csv", samples)
        write_json(out / "report.json", report)
    counts = ", ".join(f"{name} {sum(c.values())}" for name, c in report["counts"].items())
    print(f"classes {report['classes']}: {counts}; skipped {len(report['skipped'])} files")
    pairs = report["near_duplicates"]["pairs"]
    print(f"near-copies (perceptual-hash distance <= {report['near_duplicates']['threshold']}): "
          f"{sum(p['action'] == 'left out of train and val' for p in pairs)} images left out of train and val "
          f"(a twin is in test), {sum(p['action'] == 'moved from val to train' for p in pairs)} moved from val "
          f"to train (a twin is in train)")
    short = report["train_per_class"]["classes_with_fewer"]
    if short:
        print(f"split.train_per_class is {per_class}; these classes have fewer and train on all they have: "
              + ", ".join(f"{label} {n}" for label, n in short.items()))
    for row in report["skipped"]:
        print(f"  skipped {row['path']}: {row['reason']}")


if __name__ == "__main__":
    run_stage("split", main, [str(SPLIT_DIR) + "/"])
