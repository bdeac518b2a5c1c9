"""What durable writes cost: each stage's real outputs written as transferlab writes them
(temporary file, fsync, rename, fsync of the folder) against a plain write (open, write, close),
in one run on this machine's disk.

    python benchmarks/durability.py PROJECT   # a project whose pipeline has run (dvc repro)

Reports per stage: files, bytes, and the median milliseconds of each way over --repeat writes.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from transferlab.files import atomic_path

STAGES = {"fetch": ["data/fetch.json"], "split": ["data/split"], "decode": ["data/decode.json"],
          "train (per mode)": ["models/finetune.pt", "logs/finetune", "metrics/train/finetune.json",
                               "reports/train/finetune.json"],
          "evaluate": ["metrics/eval.json", "reports/eval.json", "metrics/predictions"], "plot": ["plots"]}


def files_of(project: Path, outputs: list[str]) -> list[Path]:
    paths = [project / o for o in outputs]
    return [f for p in paths for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()))]


def write_plain(data: list[bytes], folder: Path) -> None:
    for i, blob in enumerate(data):
        with open(folder / f"plain-{i}", "wb") as f:
            f.write(blob)


def write_durable(data: list[bytes], folder: Path) -> None:
    for i, blob in enumerate(data):
        with atomic_path(folder / f"durable-{i}") as tmp:
            tmp.write_bytes(blob)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("project", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print("| stage | files | MB | plain write ms | durable write ms | added ms |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=args.project) as scratch:  # the project's own disk
        folder = Path(scratch)
        for stage, outputs in STAGES.items():
            data = [f.read_bytes() for f in files_of(args.project, outputs)]
            times = {}
            for name, write in (("plain", write_plain), ("durable", write_durable)):
                runs = []
                for _ in range(args.repeat):
                    start = time.perf_counter()
                    write(data, folder)
                    runs.append(time.perf_counter() - start)
                times[name] = statistics.median(runs) * 1000
            print(f"| {stage} | {len(data)} | {sum(map(len, data)) / 1e6:.1f} | {times['plain']:.1f} | "
                  f"{times['durable']:.1f} | {times['durable'] - times['plain']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
