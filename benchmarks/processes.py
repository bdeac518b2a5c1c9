"""Data-parallel training on this machine: one training process against several, same run.

    python benchmarks/processes.py --archive ../shared/data/hymenoptera_data.zip

The train stage per mode, batch size and `train.processes`, on hymenoptera with
efficientnet_lite0 (its real ImageNet weights, so the accuracies mean something): wall seconds
of the whole stage (process start-up included), training images/s after the first epoch, best
val accuracy, and the ratio to one process at the same batch size. The decoded images and the
hardware decisions are made before the timings; extract's embedding cache is deleted before each
timed run, so its timing includes the one embedding pass (shared among the processes).
"""
import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from speed import ROOT, bench_env, make_project, set_params, sh, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", default=str(ROOT.parent / "shared/data/hymenoptera_data.zip"))
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--modes", nargs="+", default=["finetune", "extract"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="transferlab-processes-") as tmp:
        work = Path(tmp)
        env = bench_env(work)
        project = make_project(work, str(Path(args.archive).resolve()), args.epochs)
        set_params(project, model=args.model)
        for stage in ("fetch", "split", "decode"):
            sh([sys.executable, "-m", f"transferlab.stages.{stage}"], project, env)
        print("| mode | batch | processes | wall s | steady img/s | best val acc | optimizer steps/epoch | "
              "wall ratio | img/s ratio |")
        print("|---|---|---|---|---|---|---|---|---|")
        for mode in args.modes:
            for batch in args.batch_sizes:
                first = None
                for processes in args.processes:
                    set_params(project, train={"batch_size": batch, "processes": processes})
                    # A first, untimed run makes the hardware decision for this world size.
                    set_params(project, train={"epochs": 1})
                    sh([sys.executable, "-m", "transferlab.stages.train", mode], project, env)
                    set_params(project, train={"epochs": args.epochs})
                    for cache in (project / "data/cache").glob("features-*"):
                        shutil.rmtree(cache) if cache.is_dir() else cache.unlink()
                    wall, _ = timed([sys.executable, "-m", "transferlab.stages.train", mode], project, env)
                    report = json.loads((project / f"reports/train/{mode}.json").read_text())
                    speed = report["steady_images_per_s"] or report["train_images_per_s"]
                    first = first or (wall, speed)
                    print(f"| {mode} | {batch} | {processes} | {wall:.0f} | {speed:.1f} | "
                          f"{report['best_val_accuracy']:.3f} | {report['optimizer_steps_per_epoch']} | "
                          f"{first[0] / wall:.2f}x | {speed / first[1]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
