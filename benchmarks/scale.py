"""Scale benchmark: memory, time and disk as the dataset grows, against the tutorial's recipe.

    python benchmarks/scale.py --sizes 2500 10000 [--classes 40] [--baseline-up-to 10000]

For each size N: a generated folder of N real-looking 500x375 JPEGs (random crops of the
hymenoptera photos) in C classes; then fetch, split, decode and train-extract (efficientnet_lite0,
one epoch, real weights), each stage as its own process under ../shared/tools/peak_anon.py (the
largest anonymous resident memory of any process of the stage: memory-mapped pages the kernel can
drop do not count). Reported per stage: wall seconds and peak MB; per store: MB on disk (the
source folder, data/raw, DVC's cache after `dvc commit`, the decoded images, the embeddings).
The tutorial's recipe (ImageFolder, one epoch of extract) runs under the same meter up to
--baseline-up-to images. Ratios are against the smallest size, measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PEAK = ROOT.parent / "shared" / "tools" / "peak_anon.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
from speed import make_project, set_params  # noqa: E402


def _generate(job: tuple[str, str, int]) -> None:
    source, out, seed = job
    rng = random.Random(seed)
    with Image.open(source) as image:
        image = image.convert("RGB")
        w, h = image.size
        cw, ch = rng.randint(w // 3, w), rng.randint(h // 3, h)
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = image.crop((left, top, left + cw, top + ch)).resize((500, 375), Image.BILINEAR)
    crop.save(out, quality=90)


def generate(archive: Path, dest: Path, n: int, classes: int) -> Path:
    """N JPEGs in `classes` folders, each a random crop of a hymenoptera photo."""
    photos = dest.parent / "photos"
    if not photos.exists():
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(photos)
    sources = sorted(str(p) for p in photos.rglob("*.jpg"))
    jobs = []
    for i in range(n):
        folder = dest / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((sources[i % len(sources)], str(folder / f"{i:06d}.jpg"), i))
    with multiprocessing.Pool() as pool:
        pool.map(_generate, jobs, chunksize=64)
    return dest


def metered(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """(wall seconds, peak anonymous MB) of a command and its children."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(PEAK), *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    peak = float(re.search(r"peak RssAnon (\d+) MB", result.stdout.splitlines()[-1]).group(1))
    return wall, peak


def size_mb(*paths: Path) -> float:
    """MB on disk under `paths`; hard links to one file count once (DVC's cache and data/raw share)."""
    files = [f for path in paths if path.exists()
             for f in ([path] if path.is_file()
                       else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()])]
    seen, total = set(), 0
    for f in files:
        stat = f.stat()
        if (stat.st_dev, stat.st_ino) not in seen:
            seen.add((stat.st_dev, stat.st_ino))
            total += stat.st_size
    return total / 1e6


def bench(n: int, classes: int, archive: Path, work: Path, env: dict, baseline: bool) -> dict:
    folder = generate(archive, work / f"images-{n}", n, classes)
    project = make_project(work / f"project-{n}", str(folder), 1)
    set_params(project, model="efficientnet_lite0")
    row = {"images": n, "stages": {}}
    for stage in ("fetch", "split", "decode", "train extract"):
        name, *args = stage.split()
        row["stages"][stage] = metered([sys.executable, "-m", f"transferlab.stages.{name}", *args], project, env)
    # data/raw into DVC's cache, then linked back, as `dvc repro` leaves it after `--relink`.
    # Only the fetch stage: the trainers' outputs other than extract's do not exist here.
    for command in (["commit", "-f", "-q", "fetch"], ["checkout", "--relink", "-q", "fetch"]):
        subprocess.run([sys.executable, "-m", "dvc", *command], cwd=project, env=env, check=True)
    cache = project / "data" / "cache"
    row["disk_mb"] = {"source folder": size_mb(folder), "data/raw": size_mb(project / "data/raw"),
                      "DVC cache": size_mb(project / ".dvc/cache"),
                      "data/raw + DVC cache together": size_mb(project / "data/raw", project / ".dvc/cache"),
                      "decoded images": sum(size_mb(p) for p in cache.glob("decoded-*")),
                      "embeddings": sum(size_mb(p) for p in cache.glob("features-*"))}
    if baseline:
        row["baseline"] = metered([sys.executable, str(ROOT / "benchmarks/tutorial_baseline.py"), "--model",
                                   "efficientnet_lite0", "--mode", "extract", "--epochs", "1"], project, env)
    shutil.rmtree(folder)
    print(json.dumps(row), flush=True)
    return row


def print_tables(rows: list[dict]) -> None:
    stages = list(rows[0]["stages"])
    print("\n| images | " + " | ".join(f"{s} s / peak MB" for s in stages) + " | tutorial recipe s / peak MB |")
    print("|---|" + "---|" * (len(stages) + 1))
    for r in rows:
        cells = [f"{w:.0f} / {m:.0f}" for w, m in r["stages"].values()]
        base = r.get("baseline")
        print(f"| {r['images']:,} | " + " | ".join(cells) + f" | {f'{base[0]:.0f} / {base[1]:.0f}' if base else '-'} |")
    first = rows[0]["stages"]["train extract"][1]
    print("\npeak memory of train-extract against the smallest size: "
          + ", ".join(f"{r['images']:,}: {r['stages']['train extract'][1] / first:.2f}x" for r in rows))
    kinds = list(rows[0]["disk_mb"])
    print("\n| images | " + " | ".join(f"{k} MB" for k in kinds) + " |\n|---|" + "---|" * len(kinds))
    for r in rows:
        print(f"| {r['images']:,} | " + " | ".join(f"{r['disk_mb'][k]:.0f}" for k in kinds) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", default=str(ROOT.parent / "shared/data/hymenoptera_data.zip"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[2500, 10000, 40000])
    parser.add_argument("--classes", type=int, default=40)
    parser.add_argument("--baseline-up-to", type=int, default=10000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="transferlab-scale-"))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("TRANSFERLAB_CACHE_DIR", None)
    print(f"{os.cpu_count()} CPUs; work dir {work}", flush=True)
    rows = [bench(n, args.classes, Path(args.archive), work, env, n <= args.baseline_up_to) for n in args.sizes]
    print_tables(rows)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
