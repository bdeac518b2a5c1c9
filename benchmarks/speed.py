"""Speed benchmark: transferlab's stages against the tutorial's recipe, in one run, same machine.

    python benchmarks/speed.py --archive ../shared/data/hymenoptera_data.zip

Per model and mode: wall time, training images/s, test accuracy, peak memory, for the baseline
(benchmarks/tutorial_baseline.py) and transferlab's train stage, and the ratio baseline/transferlab.
Then the whole pipeline (all eight stages, empty DVC cache) against the baseline's three training
runs, and how wall time and cache size grow on a generated dataset `--scale` times larger.
squeezenet and resnet18 get random weights under torchvision's own cache file names (speed does
not depend on the values; the real loading path still runs); efficientnet_lite0 has its real ones.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from PIL import Image, ImageOps
from torchvision.models import get_model, get_model_weights

ROOT = Path(__file__).resolve().parents[1]
MODES = ("finetune", "extract", "scratch")


def sh(cmd: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def make_project(work: Path, archive: str, epochs: int) -> Path:
    """A git + DVC repo holding the pipeline, its params pointed at `archive`."""
    project = work / "project"
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("dvc.yaml", "params.yaml", "curves/pipeline.yaml", "curves/params.yaml"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, project / name)
    set_params(project, data={"url": archive}, train={"epochs": epochs})
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=project, check=True)
    shutil.copy2(ROOT / ".dvc/config", project / ".dvc/config")  # the project's cache link type
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    subprocess.run(git + ["add", "-A"], cwd=project, check=True)
    subprocess.run(git + ["commit", "-qm", "benchmark project"], cwd=project, check=True)  # dvclive needs one
    return project


def set_params(project: Path, model: str | None = None, **sections) -> None:
    """Set `model`, top-level values (seed=1) and keys of sections (train={"epochs": 2})."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    if model:
        params["model"] = model
    for section, values in sections.items():
        if isinstance(values, dict):
            params[section].update(values)
        else:
            params[section] = values
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def write_random_weights(torch_home: Path, arch: str) -> None:
    path = torch_home / "hub" / "checkpoints" / get_model_weights(arch).DEFAULT.url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(get_model(arch, weights=None).state_dict(), path)


def bench_env(work: Path) -> dict:
    """The environment for stages run by a benchmark: random weights for squeezenet and resnet18
    under torchvision's own cache file names in work/torch_home, this interpreter's tools first."""
    torch_home = work / "torch_home"
    for arch in ("squeezenet1_0", "resnet18"):
        write_random_weights(torch_home, arch)
    return {**os.environ, "TORCH_HOME": str(torch_home), "DVC_NO_ANALYTICS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    out = sh(cmd, cwd, env)
    return time.perf_counter() - start, out


def bench_model(project: Path, model: str, epochs: int, env: dict) -> list[dict]:
    """Baseline and transferlab, each mode, for one model; decode/feature caches start empty."""
    set_params(project, model=model)
    shutil.rmtree(project / "data" / "cache", ignore_errors=True)
    decode, _ = timed([sys.executable, "-m", "transferlab.stages.decode"], project, env)
    print(f"  {model} decode (every image of the three splits, all cores): {decode:.1f} s", flush=True)
    rows = []
    for mode in MODES:
        wall, _ = timed([sys.executable, "-m", "transferlab.stages.train", mode], project, env)
        ours = json.loads((project / f"reports/train/{mode}.json").read_text())
        base = json.loads(sh([sys.executable, str(ROOT / "benchmarks/tutorial_baseline.py"), "--model", model,
                              "--mode", mode, "--epochs", str(epochs)], project, env).strip().splitlines()[-1])
        rows.append({"model": model, "mode": mode, "base": base,
                     "ours": {"wall_seconds": wall, "train_images_per_s": ours["train_images_per_s"],
                              "first_epoch_images_per_s": ours["first_epoch_images_per_s"],
                              "steady_images_per_s": ours["steady_images_per_s"],
                              "setting": f"{ours['precision']}{' + CL' if ours['channels_last'] else ''}, "
                                         f"{ours['input_path']}",
                              "peak_rss_mb": ours["peak_rss_mb"], "features_cached": ours["features_cached"],
                              "peak_rss_mb_after_epoch_1": ours["peak_rss_mb_after_epoch_1"]}})
        print(f"  {model} {mode}: baseline {base['wall_seconds']:.0f}s, transferlab {wall:.0f}s", flush=True)
    sh([sys.executable, "-m", "transferlab.stages.evaluate"], project, env)
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    for row in rows:
        row["ours"]["test_accuracy"] = evaluation[row["mode"]]["accuracy"]
    return rows


def print_table(rows: list[dict]) -> None:
    header = ("model", "mode", "wall base s", "wall ours s", "wall ratio", "img/s base", "img/s ours (1st epoch)",
              "img/s ratio", "auto chose", "test acc base", "test acc ours", "peak MB base",
              "peak MB ours (after epoch 1)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        b, o = r["base"], r["ours"]
        steady = o["steady_images_per_s"] or o["train_images_per_s"]
        ips = "n/a (head only)" if o["features_cached"] else f"{steady:.1f} ({o['first_epoch_images_per_s']:.1f})"
        ips_ratio = "" if o["features_cached"] else f"{o['train_images_per_s'] / b['train_images_per_s']:.2f}x"
        print(f"| {r['model']} | {r['mode']} | {b['wall_seconds']:.0f} | {o['wall_seconds']:.0f} | "
              f"{b['wall_seconds'] / o['wall_seconds']:.1f}x | {b['train_images_per_s']:.1f} | {ips} | {ips_ratio} | "
              f"{o['setting']} | {b['test_accuracy']:.3f} | {o['test_accuracy']:.3f} | {b['peak_rss_mb']:.0f} | "
              f"{o['peak_rss_mb']:.0f} ({o['peak_rss_mb_after_epoch_1']:.0f}) |")


def whole_pipeline(work: Path, archive: str, epochs: int, model: str, env: dict, name: str) -> tuple[float, int, dict]:
    """`dvc repro` of all eight stages from an empty DVC cache: (wall seconds, cache bytes, each
    training stage's wall seconds)."""
    project = make_project(work / name, archive, epochs)
    set_params(project, model=model)
    wall, _ = timed([sys.executable, "-m", "dvc", "repro"], project, env)
    cache = sum(p.stat().st_size for p in (project / "data" / "cache").rglob("*") if p.is_file())
    training = {mode: json.loads((project / f"reports/train/{mode}.json").read_text())["wall_seconds"]
                for mode in MODES}
    return wall, cache, training


def scaled_dataset(archive: str, dest: Path, scale: int, seed: int = 0) -> Path:
    """`scale` distinct variants (crop, flip, brightness) of every image: a dataset `scale` times larger."""
    raw = dest / "extracted"
    shutil.unpack_archive(archive, raw)
    root = next(p for p in raw.rglob("train")).parent
    rng = random.Random(seed)
    for path in sorted(root.rglob("*.jpg")):
        image = Image.open(path).convert("RGB")
        for k in range(scale):
            w, h = image.size
            box = (rng.randint(0, w // 10), rng.randint(0, h // 10),
                   w - rng.randint(0, w // 10), h - rng.randint(0, h // 10))
            variant = image.crop(box)
            variant = ImageOps.mirror(variant) if k % 2 else variant
            variant = variant.point(lambda v, f=rng.uniform(0.85, 1.15): min(255, int(v * f)))
            out = dest / "scaled" / path.relative_to(root).parent / f"{path.stem}_{k}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            variant.save(out, quality=90)
    return dest / "scaled"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", default=str(ROOT.parent / "shared/data/hymenoptera_data.zip"))
    parser.add_argument("--models", nargs="+", default=["squeezenet", "resnet", "efficientnet_lite0"])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--scale", type=int, default=10, help="size of the generated dataset, 0 to skip")
    parser.add_argument("--scale-epochs", type=int, default=2)
    args = parser.parse_args()
    archive = str(Path(args.archive).resolve())
    work = Path(tempfile.mkdtemp(prefix="transferlab-bench-"))
    env = bench_env(work)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}; work dir {work}", flush=True)

    project = make_project(work / "modes", archive, args.epochs)
    sh([sys.executable, "-m", "transferlab.stages.fetch"], project, env)
    sh([sys.executable, "-m", "transferlab.stages.split"], project, env)
    rows = [row for model in args.models for row in bench_model(project, model, args.epochs, env)]
    print(f"\n## Per model and mode, {args.epochs} epochs, hymenoptera\n")
    print_table(rows)

    squeeze = [r for r in rows if r["model"] == "squeezenet"]
    if squeeze:
        wall, _, training = whole_pipeline(work, archive, args.epochs, "squeezenet", env, "pipeline")
        base = sum(r["base"]["wall_seconds"] for r in squeeze)
        print(f"\nwhole pipeline, squeezenet, all eight stages, empty DVC cache: {wall:.0f} s; "
              f"baseline's three training runs: {base:.0f} s; ratio {base / wall:.1f}x")
        print("of which training stages (after imports): "
              + ", ".join(f"{mode} {seconds:.0f} s" for mode, seconds in training.items())
              + "; everything else (start-up, fetch, split, evaluate, plot, DVC): "
              + f"{wall - sum(training.values()):.0f} s")
    if args.scale:
        scaled = scaled_dataset(archive, work / "scaled", args.scale)
        small = whole_pipeline(work, archive, args.scale_epochs, "squeezenet", env, "scale1")
        large = whole_pipeline(work, str(scaled), args.scale_epochs, "squeezenet", env, f"scale{args.scale}")
        print(f"\n## Growth, squeezenet, {args.scale_epochs} epochs: 1x vs {args.scale}x images\n")
        print("| data | wall s | cache MB |\n|---|---|---|")
        for label, (wall, cache, _) in (("1x", small), (f"{args.scale}x", large)):
            print(f"| {label} | {wall:.0f} | {cache / 1e6:.0f} |")
        print(f"\nwall time grew {large[0] / small[0]:.1f}x, cache {large[1] / max(small[1], 1):.1f}x "
              f"for {args.scale}x the images")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
