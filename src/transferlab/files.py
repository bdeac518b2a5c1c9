"""Atomic, durable outputs: write beside the target, fsync, then os.replace and fsync the folder,
so neither a crash nor a power cut leaves half a file (or an empty one) where a good one stood.

Temporary files are named `.<target>.<pid>.<random>.tmp`; a later run removes those whose writer
is no longer alive (`remove_stale_temps`), never those of a writer still running beside it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterator

from transferlab.errors import UserError

# The C library's codes for "no space left" and "disk quota exceeded".
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class DiskFullError(UserError):
    """A write failed for lack of space; the message says where, how much, and what to do."""


@contextlib.contextmanager
def atomic_path(path: str | Path, size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path`, durably, only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        with no_space_message(path, size_hint):
            yield Path(tmp)
            fsync_file(tmp)
            os.replace(tmp, path)
            fsync_dir(path.parent)
    finally:
        if os.path.lexists(tmp):
            remove(Path(tmp))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces folder `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"))
    try:
        with no_space_message(path):
            yield tmp
            for file in tmp.rglob("*"):
                if file.is_file():
                    fsync_file(file)
            swap_in(tmp, path)
    finally:
        if tmp.exists():
            remove(tmp)


def swap_in(new: Path, target: Path) -> None:
    """Replace folder `target` with folder `new` (same filesystem) in two renames."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.{os.getpid()}.old.tmp")
        os.replace(target, old)
    os.replace(new, target)
    fsync_dir(target.parent)
    if old is not None:
        remove(old)


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a rename in `path` durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete temporary files and folders in `folder` left by writers that are no longer running."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        pid = _writer_pid(tmp.name)
        if pid is not None and pid != os.getpid() and not _alive(pid):
            remove(tmp)
            removed.append(tmp)
    return removed


def _writer_pid(name: str) -> int | None:
    parts = name.split(".")  # "", the target's name (dots and all), pid, random part, "tmp"
    return int(parts[-3]) if len(parts) >= 4 and parts[-3].isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def is_no_space(err: BaseException) -> bool:
    """Whether `err` is a failed write for lack of space, also as torch and numpy surface it."""
    if isinstance(err, OSError) and err.errno in _NO_SPACE:
        return True
    text = str(err)
    # torch.save reports a failed write as "basic_ios::clear: iostream error" or "file write failed".
    return isinstance(err, RuntimeError) and ("iostream error" in text or "file write failed" in text)


@contextlib.contextmanager
def no_space_message(path: Path, needed: int | None = None, kept: str = "nothing was written") -> Iterator[None]:
    """Turn a full disk while writing `path` into a DiskFullError saying what to do."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if not is_no_space(err):
            raise
        # torch's message does not say why; only a nearly full disk makes this the likely cause.
        if not isinstance(err, OSError) and free_bytes(path.parent) > (needed or 0) + (64 << 20):
            raise
        raise DiskFullError(disk_full_message(path, needed, kept=kept)) from None


def disk_full_message(path: Path, needed: int | None = None, free: int | None = None,
                      kept: str = "nothing was written") -> str:
    folder = path.parent
    need = f"about {_size(needed)} needed, " if needed else ""
    free = free_bytes(folder) if free is None else free
    return (f"{path}: no space left on {mount_point(folder)} ({need}{_size(free)} free); {kept}. Free "
            f"some space there, or move transferlab's caches to a bigger disk with "
            f"TRANSFERLAB_CACHE_DIR=<folder> (they are derived data, safe to move or delete)")


def free_bytes(folder: str | Path) -> int:
    folder = Path(folder)
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def mount_point(folder: str | Path) -> str:
    path = Path(folder).resolve()
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return str(path)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[Any]:
    """open() for writing, atomically."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends: a stage's outputs are replaced all together or
    not at all, never half of them."""
    deferred = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, deferred)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def replaced_together(*paths: str) -> Iterator[list[Path]]:
    """Temporary paths for `paths` (one ending in "/" is a folder): when the block succeeds they
    replace their targets, one after the other with SIGINT and SIGTERM held; if it fails, none does.
    A stage's outputs thus stay a set that one run wrote."""
    with contextlib.ExitStack() as held:
        with contextlib.ExitStack() as stack:
            temps = [stack.enter_context(atomic_dir(p) if p.endswith("/") else atomic_path(p)) for p in paths]
            yield temps
            held.enter_context(signals_deferred())  # released only after `stack` has replaced them all


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_writer(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def save_checkpoint(path: str | Path, checkpoint: dict) -> None:
    import torch  # here, not at the top: fetch, split and plot write no checkpoint and start without torch

    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint without executing pickled code (weights_only=True)."""
    import torch  # see save_checkpoint

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no checkpoint; run its training stage first (dvc repro)") from None
    except Exception as err:  # torch raises UnpicklingError and RuntimeError variants
        cause = str(err).strip().splitlines()[-1]
        raise UserError(f"{path}: refused to load: not a plain transferlab checkpoint (tensors and "
                        f"plain values only, no code); retrain it with dvc repro. Cause: {cause}") from None
