"""How many augmented views should extract mode embed per image? Wall time and test accuracy.

    python benchmarks/feature_views.py --archive ../shared/data/hymenoptera_data.zip

efficientnet_lite0 with its real ImageNet weights, the train-extract stage with the feature
cache at several `train.feature_views`, and with the backbone run every epoch instead
(`cache_features: false`), which is the reference accuracy.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from speed import ROOT, make_project, set_params, sh

from transferlab.engine import pick_hardware
from transferlab.files import load_checkpoint
from transferlab.stages.evaluate import predict_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", default=str(ROOT.parent / "shared/data/hymenoptera_data.zip"))
    parser.add_argument("--views", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="transferlab-views-"))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    project = make_project(work, str(Path(args.archive).resolve()), args.epochs)
    set_params(project, model="efficientnet_lite0")
    for stage in ("fetch", "split"):
        sh([sys.executable, "-m", f"transferlab.stages.{stage}"], project, env)
    print("| feature cache | views | wall s | test accuracy |\n|---|---|---|---|")
    for views in [*args.views, None]:
        set_params(project, train={"cache_features": views is not None, "feature_views": views or 1})
        shutil.rmtree(project / "data/cache", ignore_errors=True)  # time the embedding too
        start = time.perf_counter()
        sh([sys.executable, "-m", "transferlab.stages.train", "extract"], project, env)
        wall = time.perf_counter() - start
        os.chdir(project)
        predictions, _ = predict_test(load_checkpoint("models/extract.pt"), 32, pick_hardware())
        accuracy = float((predictions.probs.argmax(1) == predictions.targets).mean())
        label = ("on", views) if views else ("off (backbone every epoch)", "-")
        print(f"| {label[0]} | {label[1]} | {wall:.0f} | {accuracy:.3f} |", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
