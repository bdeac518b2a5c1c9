"""Atomic, durable outputs: write beside the target, fsync, then os.replace and fsync the folder,
so neither a crash nor a power cut leaves half a file (or an empty one) where a good one stood.

Temporary files are named `.<target>.<pid>.<random>.tmp`; a later run removes those whose writer
is no longer alive (`remove_stale_temps`), never those of a writer still running beside it.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from transferlab.errors import UserError, warn

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
    os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes it 0600; an output is as readable as open() makes it
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
    # mkdtemp makes it 0700; make it what mkdir would: the umask's mode, and the setgid bit inherited
    # from a setgid parent (a shared folder's group carries on down). swap_in keeps a replaced one's.
    tmp.chmod((0o777 & ~umask()) | (tmp.stat().st_mode & stat.S_ISGID))
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
    """Replace folder `target` with folder `new` (same filesystem). On Linux one atomic exchange:
    no moment without a `target`. Elsewhere two renames, the old folder parked as
    `.<target>.<pid>.old.tmp` between them: a crash there leaves it, and `remove_stale_temps`
    puts it back rather than delete it. `new` takes the old folder's mode and group."""
    if target.exists():
        keep_mode(target, new)
        if _exchange(new, target):  # `new` now holds the old folder
            fsync_dir(target.parent)
            remove(new)
            return
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.{os.getpid()}{OLD_SUFFIX}")
        os.replace(target, old)
    os.replace(new, target)
    fsync_dir(target.parent)
    if old is not None:
        remove(old)


def keep_mode(old: Path, new: Path) -> None:
    """Give folder `new` the group and mode bits of `old` (setgid included: in a shared project a
    folder's files inherit its group), as far as this user may set them."""
    before = old.stat()
    if new.stat().st_gid != before.st_gid:
        with contextlib.suppress(PermissionError):  # a group this user is not in
            os.chown(new, -1, before.st_gid)
    new.chmod(stat.S_IMODE(before.st_mode))  # after chown, which may clear setgid


OLD_SUFFIX = ".old.tmp"
_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where the C
    library or the filesystem lacks it (then the caller renames twice)."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_cwd = -100  # AT_FDCWD: paths relative to the working folder, as os.replace takes them
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM):  # not supported here: fall back
        return False
    raise OSError(err, os.strerror(err), str(b))


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def umask() -> int:
    """The process's umask, which teammates sharing a project or cache folder rely on."""
    try:
        with open("/proc/self/status") as f:  # read without changing it (Linux)
            return int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)  # elsewhere the only way to read it is to set it, then set it back
        os.umask(mask)
        return mask


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


def remove_stale_temps(folder: str | Path, only: str | None = None) -> list[Path]:
    """Delete temporary files and folders in `folder` left by writers that are no longer running
    (only those for the file or folder named `only`, if given); an old folder parked by a swap that
    died half-way goes back to its place if that is empty."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        pid = _writer_pid(tmp.name)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        if only is not None and _target_name(tmp.name) != only:
            continue
        target = _parked_for(tmp)
        if target is not None and not os.path.lexists(target):
            os.replace(tmp, target)
            fsync_dir(target.parent)
            warn(f"{target}: put back the previous version, which a run that died mid-swap had set aside")
            continue
        remove(tmp)
        removed.append(tmp)
    return removed


def _parked_for(tmp: Path) -> Path | None:
    """The folder whose old version `tmp` holds, if `tmp` is one that swap_in parked."""
    if not tmp.name.endswith(OLD_SUFFIX):
        return None
    name_and_pid = tmp.name[1:-len(OLD_SUFFIX)]  # ".<target>.<pid>.old.tmp"
    return tmp.with_name(name_and_pid.rsplit(".", 1)[0])


def _target_name(name: str) -> str:
    return ".".join(name.split(".")[1:-3])  # see _writer_pid


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
    not at all, never half of them.

    A signal mask would not do: it holds only for the thread that sets it, and the kernel hands a
    process's signal to any thread that does not block it (torch's OpenMP threads, tqdm's monitor);
    CPython then runs the Python handler in the main thread anyway, inside the block. So the
    handlers themselves are replaced by one that notes the signal, which is raised again after."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread has handlers
        yield
        return
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            signal.raise_signal(received[0])  # its own handler runs now: the block is done


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
