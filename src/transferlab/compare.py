"""Experiments -> a leaderboard that says which model and mode is best, and whether it really is.

Every run (a DVC experiment or a git revision) is read from git, never re-run and never checked
out: its params, its test predictions per mode, and its reports. Runs that differ only in `seed`
are pooled into one row per (model, mode, other differing params), each seed once. Rows are compared on the same
test images:

- the accuracy interval is a hierarchical bootstrap: seeds and test images both resampled, so it
  holds seed-to-seed spread and test-set sampling noise together;
- the verdict against the best row (`metrics.judge`; its test is `metrics.paired_difference`,
  the one evaluate uses) counts both sources of noise, paired on images: which test images were
  drawn, and the seed-to-seed spread of each row; with one seed per row it is McNemar's exact
  test. Its p values are Holm-adjusted over the rows compared with the best. A row is "better" or
  "worse" when that p is below 5%; "not distinguishable" only when both rows have two seeds or
  more and even the largest gap their runs allow is one that no number of seeds could show on
  these test images; otherwise "too few runs to tell", with about how many seeds per row would
  tell, or, one seed each, that the seed-to-seed spread is unmeasured.
"""
from __future__ import annotations

import csv
import io
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from transferlab.errors import UserError, warn
from transferlab.metrics import bootstrap_interval, judge, paired_difference, verdict


@dataclass
class ModeResult:
    right: np.ndarray               # (test images,) bool: correct on each
    train_seconds: float | None
    trainable_parameters: int | None
    inference_images_per_s: float | None
    backbone: dict | None = None    # kind of pretraining, parameters, embedding size (models.backbone_summary)


@dataclass
class Run:
    label: str                      # experiment name or revision as given
    rev: str                        # commit
    params: dict                    # params.yaml, flattened: {"train.lr": 0.001, ...}
    test_images: list[tuple[str, str]]  # (path, true class), in order
    modes: dict[str, ModeResult] = field(default_factory=dict)


def git_show(rev: str, path: str, cwd: Path) -> str | None:
    result = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=cwd, capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None


def resolve(rev: str, cwd: Path) -> str:
    """A revision, branch, tag or experiment name -> its commit."""
    for candidate in (rev, f"refs/exps/{rev}"):
        result = subprocess.run(["git", "rev-parse", "--verify", "-q", f"{candidate}^{{commit}}"], cwd=cwd,
                                capture_output=True, text=True)
        if result.returncode == 0:
            return result.stdout.strip()
    shown = subprocess.run(["dvc", "exp", "show", "--json", "-A"], cwd=cwd, capture_output=True, text=True)
    for label, commit in _experiments(json.loads(shown.stdout or "[]")):
        if label == rev:
            return commit
    raise UserError(f"{rev!r} is neither a git revision nor an experiment name (see `dvc exp show`)")


def baseline_runs(cwd: Path) -> list[tuple[str, str]]:
    """(label, commit) of the current baseline and every experiment of it, as `dvc exp show` lists."""
    shown = subprocess.run(["dvc", "exp", "show", "--json"], cwd=cwd, capture_output=True, text=True)
    if shown.returncode != 0:
        raise UserError(f"dvc exp show failed: {shown.stderr.strip()}")
    return _experiments(json.loads(shown.stdout or "[]"), with_baselines=True)


def _experiments(shown: list, with_baselines: bool = False) -> list[tuple[str, str]]:
    runs, unfinished = [], {}
    for baseline in shown:
        if baseline.get("rev") == "workspace":
            continue
        if with_baselines:
            runs.append((baseline.get("name") or baseline["rev"][:7], baseline["rev"]))
        for experiment in baseline.get("experiments") or []:
            # A queued, running or failed task of `dvc queue` has no results yet; a finished or
            # pulled experiment has state success or no executor at all.
            state = (experiment.get("executor") or {}).get("state", "success")
            if state != "success":
                unfinished[state] = unfinished.get(state, 0) + 1
                continue
            rev = experiment["revs"][0]
            runs.append((rev.get("name") or rev["rev"][:7], rev["rev"]))
    if unfinished:
        counts = ", ".join(f"{n} {state}" for state, n in sorted(unfinished.items()))
        warn(f"left out the queue's experiments without results ({counts}; see `dvc queue status`)")
    return runs


def read_run(label: str, rev: str, cwd: Path) -> Run | None:
    """A run's results from git, or None if that commit has no evaluated pipeline."""
    evaluation = git_show(rev, "metrics/eval.json", cwd)
    params = git_show(rev, "params.yaml", cwd)
    if evaluation is None or params is None:
        return None
    details = json.loads(git_show(rev, "reports/eval.json", cwd) or "{}")
    run = Run(label, rev, flatten(yaml.safe_load(params)), [])
    for mode in json.loads(evaluation):
        rows = list(csv.DictReader(io.StringIO(git_show(rev, f"metrics/predictions/{mode}.csv", cwd) or "")))
        if not rows:
            continue
        images = [(r["path"], r["actual"]) for r in rows]
        if run.test_images and images != run.test_images:
            raise UserError(f"{label}: the modes were evaluated on different test images")
        run.test_images = images
        train = json.loads(git_show(rev, f"reports/train/{mode}.json", cwd) or "{}")
        run.modes[mode] = ModeResult(np.array([r["actual"] == r["predicted"] for r in rows]),
                                     train.get("wall_seconds"), train.get("trainable_parameters"),
                                     details.get(mode, {}).get("inference_images_per_s"), train.get("backbone"))
    return run if run.modes else None


def flatten(params: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def check_same_test_set(runs: list[Run]) -> None:
    first = runs[0]
    for run in runs[1:]:
        if run.test_images != first.test_images:
            ours, theirs = set(first.test_images), set(run.test_images)
            raise UserError(
                f"test sets differ: {first.label} has {len(ours)} test images, {run.label} has {len(theirs)}, "
                f"{len(ours ^ theirs)} of them not in both. A paired comparison needs the same test images: "
                f"compare runs of the same data (data.url) and test split (split.test_seed)")


def differing_params(runs: list[Run], mode: str, modes: set[str]) -> list[str]:
    """Params that differ between runs, except seed, model (a column of its own) and other modes'
    override sections."""
    keys = sorted({k for run in runs for k in run.params})
    relevant = [k for k in keys
                if k not in ("seed", "model") and not (k.split(".")[0] in modes and k.split(".")[0] != mode)]
    return [k for k in relevant if len({json.dumps(run.params.get(k)) for run in runs}) > 1]


def leaderboard(runs: list[Run], seed: int = 0) -> list[dict]:
    """One row per (model, mode, differing params), best first; every other row with its verdict."""
    if not runs:
        raise UserError("no runs with evaluated results to compare: run `dvc exp run` (or `dvc repro` and "
                        "commit), then compare")
    check_same_test_set(runs)
    modes = {mode for run in runs for mode in run.modes}
    # A row's runs by seed and answers: a run with a seed its row holds and the same right answers
    # on every test image is the same training (an experiment that changed only another mode's
    # keys carries this mode's outputs over), and counting it again would pass one seed off as two.
    groups: dict[tuple, dict[tuple, tuple[Run, ModeResult]]] = {}
    for mode in sorted(modes):
        keys = differing_params(runs, mode, modes)
        for run in runs:
            if mode in run.modes:
                key = (run.params.get("model"), mode, tuple((k, json.dumps(run.params.get(k))) for k in keys))
                same = (json.dumps(run.params.get("seed")), run.modes[mode].right.tobytes())
                groups.setdefault(key, {}).setdefault(same, (run, run.modes[mode]))
    for key, members in groups.items():
        seeds = [run_seed for run_seed, _ in members]
        for shared in sorted({s for s in seeds if seeds.count(s) > 1}):  # other answers: code, data or hardware
            labels = [run.label for (run_seed, _), (run, _) in members.items() if run_seed == shared]
            warn(f"{key[1]}: runs {', '.join(labels)} share a seed but answer differently (changed code, data or "
                 f"hardware settings?); each counts as a run of its own")
    rng = np.random.default_rng(seed)
    rows = [summarise(key, list(members.values()), rng) for key, members in groups.items()]
    rows.sort(key=lambda row: -row["accuracy_mean"])
    best = rows[0]
    best["best"], best["verdict"], best["p_value"] = True, "best", None
    tests = judge([(row.pop("_right"), best["_right"]) for row in rows[1:]])
    for row, test in zip(rows[1:], tests):
        row.update(best=False, p_value=test["p_adjusted"], p_unadjusted=test["p_value"], test=test["test"],
                   seeds_needed=test["seeds_needed"], verdict=test["verdict"])
    best.pop("_right")
    return rows


def summarise(key: tuple, members: list[tuple[Run, ModeResult]], rng: np.random.Generator) -> dict:
    model, mode, params = key
    right = np.stack([result.right for _, result in members]).astype(float)  # (seeds, images)
    per_seed = right.mean(1)
    low, high = bootstrap_interval(right, rng)
    return {
        "model": model, "mode": mode, "params": {k: json.loads(v) for k, v in params},
        "seeds": len(members), "runs": [run.label for run, _ in members],
        "accuracy_mean": float(per_seed.mean()),
        "accuracy_std": float(per_seed.std(ddof=1)) if len(members) > 1 else 0.0,
        "accuracy_ci95_low": low, "accuracy_ci95_high": high,
        "train_seconds": _mean([r.train_seconds for _, r in members]),
        "trainable_parameters": _first([r.trainable_parameters for _, r in members]),
        "inference_images_per_s": _mean([r.inference_images_per_s for _, r in members]),
        **backbone_columns(model, mode, _first([r.backbone for _, r in members])),
        "_right": right,
    }


def backbone_columns(model: str, mode: str, backbone: dict | None) -> dict:
    """The row's backbone: the kind of pretraining it had, its size and its embedding width, as
    the run's train report gives them (a report older than them: the kind read off the name)."""
    from transferlab.timm_source import backbone_kind

    backbone = backbone or {"kind": "random init" if mode == "scratch" else backbone_kind(str(model))}
    return {"backbone": backbone["kind"], "backbone_parameters": backbone.get("parameters"),
            "embedding_size": backbone.get("embedding_size")}


def head_to_head(a: Run, b: Run) -> list[dict]:
    """Per mode in both: does B beat A, by how much, and how sure (the honest `dvc metrics diff`)."""
    check_same_test_set([a, b])
    result = []
    for mode in [m for m in a.modes if m in b.modes]:
        ra, rb = a.modes[mode].right[None], b.modes[mode].right[None]
        test = paired_difference(rb, ra)  # one run each: McNemar's exact test, as evaluate's
        gain, p = test["gap"], test["p_value"]
        result.append({"mode": mode, "accuracy_a": float(ra.mean()), "accuracy_b": float(rb.mean()), "gain": gain,
                       "p_value": p, "verdict": verdict(gain, p, 1, test["seeds_needed"]),
                       "only_a_right": int((ra > rb).sum()), "only_b_right": int((rb > ra).sum())})
    return result


def pareto_front(rows: list[dict]) -> list[dict]:
    """Rows no other row beats on both accuracy and train time, fastest first."""
    timed = [r for r in rows if r["train_seconds"] is not None]
    front = [r for r in timed if not any(
        o["accuracy_mean"] >= r["accuracy_mean"] and o["train_seconds"] <= r["train_seconds"]
        and (o["accuracy_mean"], -o["train_seconds"]) != (r["accuracy_mean"], -r["train_seconds"]) for o in timed)]
    return sorted(front, key=lambda r: r["train_seconds"])


def markdown(rows: list[dict]) -> str:
    lines = ["| | model | backbone | backbone params | embedding | mode | params | seeds | accuracy mean ± std | "
             "95% interval | vs best (p) | train s | trainable params | inference img/s |", "|---|" + "---|" * 13]
    for row in rows:
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "-"
        versus = "best" if row["best"] else f"{row['verdict']} (p = {row['p_value']:.3g})"
        lines.append(
            f"| {'**best**' if row['best'] else ''} | {row['model']} | {row['backbone']} | "
            f"{_fmt(row['backbone_parameters'], ',')} | {_fmt(row['embedding_size'], 'd')} | {row['mode']} | "
            f"{params} | {row['seeds']} | "
            f"{row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f} | {row['accuracy_ci95_low']:.3f}–"
            f"{row['accuracy_ci95_high']:.3f} | {versus} | {_fmt(row['train_seconds'], '.0f')} | "
            f"{_fmt(row['trainable_parameters'], ',')} | {_fmt(row['inference_images_per_s'], '.0f')} |")
    return "\n".join(lines) + "\n"


def write_leaderboard(rows: list[dict], out_dir: Path) -> list[Path]:
    from transferlab.figures import plot_leaderboard
    from transferlab.files import atomic_writer, write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "leaderboard.md", out_dir / "leaderboard.json", out_dir / "leaderboard.png"]
    with atomic_writer(paths[0]) as f:
        f.write(markdown(rows))
    write_json(paths[1], rows)
    plot_leaderboard(rows, pareto_front(rows), paths[2])
    return paths


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _first(values: list):
    return next((v for v in values if v is not None), None)


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)
