"""Pipeline stages: each a thin main() that dvc.yaml runs as `python -m transferlab.stages.NAME`."""
from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Callable, NoReturn

from transferlab.errors import UserError

# Decoded images, embeddings and resume states, each keyed by what it was made from: safe to delete.
CACHE_DIR = Path("data/cache")


def _interrupt(signum, frame) -> NoReturn:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_stage(name: str, main: Callable[[], None]) -> None:
    """Run a stage's main: user errors and interruptions become one message and a non-zero exit.

    Outputs are written atomically, so an exit at any point leaves the previous ones intact.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main()
    except UserError as err:
        print(f"transferlab {name}: error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"transferlab {name}: interrupted; outputs already written are unchanged", file=sys.stderr)
        sys.exit(130)
