"""How many augmented views should extract mode embed per image? Wall time and test accuracy.

    python benchmarks/feature_views.py --archive ../shared/data/hymenoptera_data.zip

efficientnet_lite0 with its real ImageNet weights, the train-extract stage with the feature
cache at several `train.feature_views`, and with the backbone run every epoch instead
(`cache_features: false`), which is the reference accuracy. With several `--seeds` (each a
different train/val split, initialisation and augmentation), the test accuracy of each seed and
the mean number of correct test images.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from speed import ROOT, make_project, set_params, sh

from transferlab.data import ImageSource, open_split_store
from transferlab.files import load_checkpoint
from transferlab.hardware import pick_hardware
from transferlab.images import read_split
from transferlab.stages.evaluate import predict_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", default=str(ROOT.parent / "shared/data/hymenoptera_data.zip"))
    parser.add_argument("--views", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="transferlab-views-"))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    project = make_project(work, str(Path(args.archive).resolve()), args.epochs)
    set_params(project, model="efficientnet_lite0")
    sh([sys.executable, "-m", "transferlab.stages.fetch"], project, env)
    print("| feature cache | views | wall s (mean) | test accuracy per seed | correct test images (mean) |")
    print("|---|---|---|---|---|")
    for views in [*args.views, None]:
        set_params(project, train={"cache_features": views is not None, "feature_views": views or 1})
        walls, accuracies, correct = [], [], []
        for seed in args.seeds:
            set_params(project, seed=seed)
            sh([sys.executable, "-m", "transferlab.stages.split"], project, env)
            sh([sys.executable, "-m", "transferlab.stages.decode"], project, env)
            for embeddings in (project / "data/cache").glob("features-*"):  # time the embedding too
                shutil.rmtree(embeddings) if embeddings.is_dir() else embeddings.unlink()
            start = time.perf_counter()
            sh([sys.executable, "-m", "transferlab.stages.train", "extract"], project, env)
            walls.append(time.perf_counter() - start)
            os.chdir(project)
            checkpoint = load_checkpoint("models/extract.pt")
            source = ImageSource(open_split_store(Path("data/split"), checkpoint["preprocess"]["resize_size"],
                                                  Path("data/cache")))
            predictions, _ = predict_test(checkpoint, read_split("data/split/test.csv"), source, 8,
                                          pick_hardware(precision="fp32", channels_last=False))
            hits = int((predictions.probs.argmax(1) == predictions.targets).sum())
            accuracies.append(hits / len(predictions.targets))
            correct.append(hits)
        label = ("on", views) if views else ("off (backbone every epoch)", "-")
        print(f"| {label[0]} | {label[1]} | {sum(walls) / len(walls):.0f} | "
              f"{' '.join(f'{a:.3f}' for a in accuracies)} | {sum(correct) / len(correct):.1f} |", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
