"""train MODE: split CSVs -> models/MODE.pt, logs/MODE/ (per-epoch curves), metrics/train/MODE.json
(the headline numbers) and reports/train/MODE.json (speed, memory, hardware).

MODE is finetune (all weights from ImageNet), extract (frozen ImageNet backbone, new head) or
scratch (random init). The checkpoint kept is the epoch with the best validation accuracy.
"""
import platform
import sys
import time
from functools import partial
from importlib.metadata import version
from pathlib import Path

import torch
from dvclive import Live
from scmrepo.exceptions import SCMError

import transferlab
from transferlab.data import read_splits
from transferlab.distributed import (
    World,
    join,
    leave,
    resolve_processes,
    spawn,
    started_by_torchrun,
    use_least_used_gpu,
)
from transferlab.errors import UserError
from transferlab.files import read_json, replaced_together, save_checkpoint, write_json
from transferlab.images import samples_digest
from transferlab.models import MODES, describe
from transferlab.params import load_params, to_dict
from transferlab.stages import RESUME_DIR, cache_dir, require_inputs, run_stage
from transferlab.training import headline, summary, train_mode

SPLIT_DIR = Path("data/split")


def outputs(mode: str) -> list[str]:
    return [f"models/{mode}.pt", f"logs/{mode}/", f"metrics/train/{mode}.json", f"reports/train/{mode}.json"]


def main(mode: str) -> None:
    """Train one mode: in this process, in `train.processes` processes it starts, or as one of
    the processes torchrun started (which then decides their number)."""
    require_inputs({str(SPLIT_DIR / f"{name}"): "split" for name in ("train.csv", "val.csv", "report.json")})
    train = load_params().for_mode(mode)
    if started_by_torchrun():
        world = join(train.device)
        try:
            check_batch_size(train.batch_size, world.size)
            run(mode, world)
        finally:
            leave()
        return
    processes = resolve_processes(train.processes, train.device)
    check_batch_size(train.batch_size, processes)
    if processes == 1:  # on the least-used GPU where there are several: queued experiments spread over them
        run(mode, World(local_rank=use_least_used_gpu(train.device, cache_dir() / "gpus")))
    else:
        print(f"{mode}: {processes} processes, each computing a share of every batch", flush=True)
        spawn(partial(run, mode), processes, train.device, f"{mode} training")


def check_batch_size(batch_size: int, processes: int) -> None:
    if batch_size < processes:
        raise UserError(f"train.batch_size is {batch_size}, fewer images than the {processes} training processes "
                        f"share: each needs at least one of every full batch. Raise batch_size or lower "
                        f"train.processes")


def run(mode: str, world: World) -> None:
    """One process's part of training `mode`; rank 0 writes every output."""
    start = time.perf_counter()
    params = load_params()
    train = params.for_mode(mode)
    classes = read_json(SPLIT_DIR / "report.json")["classes"]
    samples = read_splits(SPLIT_DIR)
    data_key = samples_digest(samples["train"] + samples["val"])
    identity = [params.model, params.weights, params.seed, to_dict(train), data_key, world.size]
    trained = train_mode(params.model, mode, train, params.seed, classes, samples, SPLIT_DIR, cache_dir(),
                         (RESUME_DIR, mode, identity), world, weights=params.weights)
    if not world.main:
        return
    built, model, result, resume_path = trained.built, trained.model, trained.result, trained.resume_path
    details = summary(result, built, model, trained.hw, time.perf_counter() - start, trained.steps_per_epoch,
                      world.size)
    if trained.lr_find is not None:
        details["lr_find"] = trained.lr_find  # the sweep, its rule and its pick
    with replaced_together(*outputs(mode)) as (checkpoint, logs, metrics, report):  # all four or none
        save_checkpoint(checkpoint, {
            **describe(built), "format": 1, "mode": mode, "model": params.model, "classes": classes,
            "state_dict": {k: v.detach().cpu() for k, v in built.model.state_dict().items()},
            "best_epoch": result.best_epoch, "features_cached": model is not built.model,
            "params": {"seed": params.seed, "weights": params.weights, "train": to_dict(train)},
            "weights_id": built.weights_id, "versions": versions()})
        write_logs(logs, result.history)
        if trained.lr_find is not None:
            from transferlab.figures import plot_lr_find  # matplotlib: only where there is a sweep to draw

            plot_lr_find(trained.lr_find, logs / "lr_find.png", f"{params.model} {mode}")
        write_json(metrics, headline(details))
        write_json(report, details)
    if resume_path is not None:
        resume_path.unlink()  # finished: the next run starts afresh
    print(f"{mode}: best val accuracy {result.best_val.accuracy:.4f} at epoch {result.best_epoch}")


def write_logs(directory: Path, history: list[dict]) -> None:
    """Per-epoch curves as dvclive TSVs for `dvc plots` (dvc.yaml declares them, so dvcyaml=False)."""
    try:
        live = Live(str(directory), dvcyaml=False, save_dvc_exp=False)
    except SCMError as err:  # dvclive reads git's HEAD, which a repo without commits lacks
        raise UserError(f"git: {err}; dvclive logs against a commit: run `git add -A && git commit -m "
                        f"start` once, then run the pipeline again") from None
    try:
        with live:
            for record in history:
                for name in ("loss", "acc"):
                    live.log_metric(f"train/{name}", record[f"train_{name}"])
                    live.log_metric(f"val/{name}", record[f"val_{name}"])
                live.next_step()
    except FileNotFoundError as err:
        # dvclive's last act removes a signal file for VS Code that every experiment of a queue
        # shares (.dvc/tmp/exps/run/DVCLIVE_STEP_COMPLETED); with `-j 2` another experiment can
        # remove it first. The logs are written by then.
        if not str(err.filename).endswith("DVCLIVE_STEP_COMPLETED"):
            raise


def versions() -> dict:
    # torchvision's from its installed metadata: importing it costs a second or more, which a
    # stage training efficientnet_lite0 need not pay (torch's version names the build: +cu130).
    return {"transferlab": transferlab.__version__, "torch": str(torch.__version__),
            "torchvision": version("torchvision"), "python": platform.python_version()}


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in MODES:
        sys.exit(f"usage: python -m transferlab.stages.train {{{','.join(MODES)}}}")
    run_stage("train", lambda: main(sys.argv[1]), outputs(sys.argv[1]))
