"""Pipeline stages: each a thin main() that dvc.yaml runs as `python -m transferlab.stages.NAME`.

Every output in dvc.yaml is `persist: true`, so DVC leaves the previous outputs in place while a
stage runs, and the stage replaces them only once they are complete (files.py). Whatever ends a
stage early (bad input, Ctrl-C, SIGTERM, a full disk), its outputs are those of the last run that
finished.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Callable, NoReturn

from transferlab.errors import UserError
from transferlab.files import remove_stale_temps


def cache_dir() -> Path:
    """Where derived data lives (decoded images, embeddings, hardware decisions): safe to delete.

    TRANSFERLAB_CACHE_DIR if set; else the project's data/cache, shared with the experiments that
    `dvc queue start` runs in copies of the project under .dvc/tmp/exps/, so a sweep decodes once.
    """
    if os.environ.get("TRANSFERLAB_CACHE_DIR"):
        return Path(os.environ["TRANSFERLAB_CACHE_DIR"])
    cwd = Path.cwd()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i]) / "data" / "cache"
    return Path("data/cache")


# Per-epoch training states: per workspace, since only the run that wrote one can continue it.
RESUME_DIR = Path("data/cache/resume")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: a KeyboardInterrupt, so `except Exception` never swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame) -> NoReturn:
    raise Interrupted(signum)


def require_inputs(inputs: dict[str, str]) -> None:
    """UserError naming every missing input path and the stage that makes it."""
    missing = {path: stage for path, stage in inputs.items() if not Path(path).exists()}
    if missing:
        what = "; ".join(f"{path} is missing (the {stage} stage makes it)" for path, stage in missing.items())
        stages = " ".join(dict.fromkeys(missing.values()))
        raise UserError(f"{what}. Run `dvc repro {stages}`, or `dvc repro` for the whole pipeline")


def run_stage(name: str, main: Callable[[], None], outputs: list[str]) -> None:
    """Run a stage's main, once what a dead run left of its outputs is tidied (put_back_parked): user
    errors and interruptions become one message and a non-zero exit (1, or 128 + the signal: 130 for
    Ctrl-C, 143 for SIGTERM), saying which outputs were kept."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        put_back_parked(outputs)
        main()
    except UserError as err:
        print(f"transferlab {name}: error: {err}", file=sys.stderr)
        print(kept_message(name, outputs), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"transferlab {name}: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        print(kept_message(name, outputs), file=sys.stderr)
        sys.exit(128 + signum)


def put_back_parked(outputs: list[str]) -> None:
    """Before a stage writes: each output folder that a run which died mid-swap had set aside goes
    back to its place, and the temporary files of the outputs' dead writers go (files.py)."""
    for output in outputs:
        path = Path(output.rstrip("/"))
        if path.parent.is_dir():
            remove_stale_temps(path.parent, path.name)


def kept_message(name: str, outputs: list[str]) -> str:
    kept = [path for path in outputs if Path(path).exists()]
    absent = [path for path in outputs if not Path(path).exists()]
    if not kept:
        return f"transferlab {name}: nothing was written"
    message = f"transferlab {name}: unchanged, as the last finished run left them: {', '.join(kept)}"
    if absent:
        message += (f"\ntransferlab {name}: not there before this run either: {', '.join(absent)} (`dvc "
                    f"checkout` restores the versions dvc.lock names, `git checkout -- PATH` a committed file)")
    return message
