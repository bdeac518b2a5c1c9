"""train MODE: split CSVs -> models/MODE.pt, logs/MODE/ (per-epoch curves), metrics/train/MODE.json
(the headline numbers) and reports/train/MODE.json (speed, memory, hardware).

MODE is finetune (all weights from ImageNet), extract (frozen ImageNet backbone, new head) or
scratch (random init). The checkpoint kept is the epoch with the best validation accuracy.
"""
import platform
import sys
import time
from dataclasses import replace
from functools import partial
from importlib.metadata import version
from pathlib import Path

import torch
from dvclive import Live
from scmrepo.exceptions import SCMError

import transferlab
from transferlab.data import ImageSource, open_split_store, read_splits
from transferlab.distributed import SINGLE, World, join, leave, resolve_processes, spawn, started_by_torchrun
from transferlab.engine import fit, seed_everything
from transferlab.errors import UserError
from transferlab.files import read_json, replaced_together, save_checkpoint, write_json
from transferlab.images import samples_digest
from transferlab.models import MODES, build_for_mode, describe
from transferlab.params import load_params, to_dict
from transferlab.stages import RESUME_DIR, cache_dir, require_inputs, run_stage
from transferlab.training import (
    backbone_trains,
    head_spec,
    headline,
    optimizer_and_scheduler,
    prepare,
    resume_file,
    summary,
    train_hardware,
    train_head_first,
)

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
    if processes == 1:
        run(mode, SINGLE)
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
    seed_everything(params.seed, train.deterministic)
    hw = train_hardware(train)
    if hw.device.type == "cuda":
        hw = replace(hw, device=torch.device("cuda", world.local_rank))
    classes = read_json(SPLIT_DIR / "report.json")["classes"]
    built = build_for_mode(params.model, len(classes), mode, head_spec(train), train.freeze)
    samples = read_splits(SPLIT_DIR)
    source = ImageSource(open_split_store(SPLIT_DIR, built.preprocess.resize_size, cache_dir()))
    head_history = []
    if train.head_epochs and backbone_trains(built):  # freeze, train the head, then unfreeze
        head_history = train_head_first(built, classes, samples, train, hw, params.seed, source, cache_dir(), world)
    hw, model, train_loader, val_loader = prepare(built, classes, samples, train, hw, params.seed, source,
                                                  cache_dir(), world)
    data_key = samples_digest(samples["train"] + samples["val"])
    optimizer, scheduler = optimizer_and_scheduler(model, built, train, len(train_loader))
    identity = [params.model, params.seed, to_dict(train), data_key, world.size]
    resume_path = resume_file(RESUME_DIR, mode, identity) if train.resume and world.main else None
    result = fit(model, train_loader, val_loader, optimizer, scheduler, train.epochs, hw,
                 train.aux_loss_weight, resume_path=resume_path, world=world)
    result.after(head_history)
    if not world.main:
        return
    model.load_state_dict(result.best_state)  # `model` may be the head alone: it lives in built.model
    details = summary(result, built, model, hw, time.perf_counter() - start, len(train_loader), world.size)
    with replaced_together(*outputs(mode)) as (checkpoint, logs, metrics, report):  # all four or none
        save_checkpoint(checkpoint, {
            **describe(built), "format": 1, "mode": mode, "model": params.model, "classes": classes,
            "state_dict": {k: v.detach().cpu() for k, v in built.model.state_dict().items()},
            "best_epoch": result.best_epoch, "features_cached": model is not built.model,
            "params": {"seed": params.seed, "train": to_dict(train)}, "versions": versions()})
        write_logs(logs, result.history)
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
