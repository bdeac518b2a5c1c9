"""What the cache folder holds, and pruning it: all of it is derived data, rebuilt when needed.

Kinds: decoded-image stores (one per dataset and resize), embedding caches (one per model, seed,
views, precision and split), hardware decisions (small), resume states (deleted when a run
finishes). Stores and embeddings grow with sweeps over resizes, models and seeds; each open marks
its entry as used, so `prune` can delete those unused for a while.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from transferlab.files import remove

KINDS = {"decoded-": "decoded images", "features-": "embeddings", "hardware": "hardware decisions",
         "resume": "resume states", "phash-": "perceptual hashes"}


@dataclass(frozen=True)
class Entry:
    kind: str
    path: Path
    bytes: int
    last_used: float  # seconds since the epoch


def mark_used(path: Path) -> None:
    """Note that an entry was just used (its modification time: access times are often not kept)."""
    try:
        os.utime(path)
    except OSError:
        pass


def entries(cache_dir: str | Path) -> list[Entry]:
    found = []
    for path in sorted(Path(cache_dir).glob("*")):
        kind = next((label for prefix, label in KINDS.items() if path.name.startswith(prefix)), None)
        if kind is None or path.suffix == ".lock":
            continue
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        found.append(Entry(kind, path, sum(f.stat().st_size for f in files), path.stat().st_mtime))
    return found


def prune(cache_dir: str | Path, unused_days: float) -> list[Entry]:
    """Delete the entries not used for `unused_days` (0: all), skipping any a process is building."""
    cutoff = time.time() - unused_days * 86400
    removed = []
    for entry in entries(cache_dir):
        if entry.last_used > cutoff and unused_days > 0:
            continue
        lock = FileLock(str(entry.path) + ".lock")
        try:
            with lock.acquire(timeout=0):
                remove(entry.path)
        except Timeout:
            continue
        # The lock file stays: unlinked, a process that had opened it could lock the old file while
        # another creates and locks a new one under the same name, and both would build the entry.
        removed.append(entry)
    return removed


def describe(found: list[Entry]) -> str:
    """A table of the entries by kind: count, size, most recent use."""
    lines = [f"{'kind':<20} {'entries':>7} {'size':>10}  last used"]
    for kind in dict.fromkeys(e.kind for e in found):
        of_kind = [e for e in found if e.kind == kind]
        size = sum(e.bytes for e in of_kind) / 1e6
        last = time.strftime("%Y-%m-%d %H:%M", time.localtime(max(e.last_used for e in of_kind)))
        lines.append(f"{kind:<20} {len(of_kind):>7} {size:>8.1f} MB  {last}")
    lines.append(f"{'total':<20} {len(found):>7} {sum(e.bytes for e in found) / 1e6:>8.1f} MB")
    return "\n".join(lines)
