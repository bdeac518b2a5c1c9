"""The learning curve on real data, timed: where its wall time goes, and what its shared caches save.

    python benchmarks/curve.py --archive ../shared/data/hymenoptera_data.zip [--epochs 5]

In a fresh project: `dvc repro decode` (fetch, split, decode), then `transferlab curve`
with efficientnet_lite0 and its real ImageNet weights, n = 2, 5, 10, 20, 50 and all images per
class, 3 seeds, 3 modes. Prints the curve (curves/curve.md) and:
- the curve's wall time, the training and testing inside its points, and the overhead: the rest
  (starting processes, importing torch, DVC's checks, building models, opening caches);
- what the shared caches saved against running each point as its own full pipeline, which would
  fetch, split and decode again every time (a new train split makes a new decode store) and, for
  extract, run the backbone over the images again: the measured cost of those steps here, times
  the points that would repeat them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from speed import ROOT, bench_env, make_project, set_params, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", default=str(ROOT.parent / "shared/data/hymenoptera_data.zip"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--sizes", nargs="+", default=["2", "5", "10", "20", "50", "all"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--work", help="keep the project here (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="transferlab-curve-"))
    project = make_project(work, str(Path(args.archive).resolve()), args.epochs)
    # Not a test of `auto`: fp32 in the layout auto picks for lite0 on the CPUs measured so far.
    set_params(project, model="efficientnet_lite0",
               train={"precision": "fp32", "channels_last": True, "tensor_batches": True})
    curve_params = yaml.safe_load((project / "curves/params.yaml").read_text())
    curve_params["curve"].update(images_per_class=[s if s == "all" else int(s) for s in args.sizes],
                                 seeds=args.seeds)
    (project / "curves/params.yaml").write_text(yaml.safe_dump(curve_params, sort_keys=False))
    env = {**bench_env(work), "PYTHONPATH": str(project / "src")}  # the project's copy: edits here do not leak in
    prepare_s, _ = timed([sys.executable, "-m", "dvc", "repro", "decode"], project, env)
    print(f"fetch + split + decode: {prepare_s:.1f} s", flush=True)
    wall, _ = timed([sys.executable, "-m", "transferlab.cli", "curve"], project, env)
    print((project / "curves/curve.md").read_text())
    report = json.loads((project / "curves/curve.json").read_text())
    spent = report["seconds"]
    inside = spent["training"] + spent["testing"]
    points = [json.loads(p.read_text()) for p in sorted((project / "curves/points").glob("*.json"))]
    extract_rest = [p["seconds"]["after_imports"] - p["seconds"]["fit"] - p["seconds"]["test"]
                    for p in points if p["mode"] == "extract"]
    embedding_s = max(extract_rest) - statistics.median(extract_rest)  # the one point that built the cache
    overhead = wall - inside - embedding_s
    print(f"curve: {len(points)} points in {wall:.0f} s wall; training {spent['training']:.0f} s, testing "
          f"{spent['testing']:.0f} s, the one embedding pass {embedding_s:.1f} s; overhead {overhead:.0f} s = "
          f"{overhead / wall:.1%} of the wall time ({overhead / len(points):.1f} s a point)")
    repeats = len(points) - 1
    extract_repeats = sum(p["mode"] == "extract" for p in points) - 1
    saved = repeats * prepare_s + extract_repeats * embedding_s
    print(f"shared caches: fetch + split + decode once instead of {len(points)} times, the embedding pass once "
          f"instead of {extract_repeats + 1} times: {saved:.0f} s saved, {saved / wall:.2f}x the curve's wall time")


if __name__ == "__main__":
    main()
