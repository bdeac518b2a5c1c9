"""Get a dataset into a folder: download or copy, verify, extract safely, swap in whole.

Nothing is written outside the output's parent folder, and the output folder is replaced only once
the new copy is complete, so a failed fetch leaves the previous one (or nothing) in place.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterator

from tqdm import tqdm

from transferlab.errors import UserError
from transferlab.files import no_space_message, remove_stale_temps, signals_deferred, swap_in, write_json

MIRROR_ENV = "TRANSFERLAB_DATA_MIRROR"
_IGNORED_TOP_LEVEL = {"__MACOSX"}


class FetchError(UserError):
    """The dataset could not be fetched; the message says from where and what to try."""


def resolve_source(url: str, mirror: str | None = None) -> str:
    """The URL or path to fetch from: `url`, or the file of the same name under the mirror."""
    if not mirror:
        return url
    name = PurePosixPath(urllib.parse.urlparse(url).path).name
    if "://" in mirror:
        return mirror.rstrip("/") + "/" + name
    return str(Path(mirror) / name)


def local_path(source: str) -> Path | None:
    """The filesystem path of a local source (plain path or file:// URL), None for remote URLs."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "":
        return Path(source)
    return None


def fetch(url: str, out_dir: str | Path, sha256: str | None = None, mirror: str | None = None,
          record: str | Path | None = None) -> dict:
    """Fetch `url` (archive or ImageFolder directory) into `out_dir`; return what was fetched, and
    write it as JSON to `record` in the same step as the swap (neither changes without the other)."""
    out_dir = Path(out_dir)
    with no_space_message(out_dir), _access_message(out_dir):
        return _fetch(url, resolve_source(url, mirror), out_dir, sha256, record)


def _fetch(url: str, source: str, out_dir: Path, sha256: str | None, record: str | Path | None) -> dict:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir.parent)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.{os.getpid()}.",
                                     suffix=".tmp") as work:
        work = Path(work)
        path = local_path(source)
        if path is not None and path.is_dir():
            digest = None
            shutil.copytree(path, work / "tree", symlinks=False)
            root = work / "tree"
        else:
            archive = path if path is not None else download(source, work / "download", url)
            if not archive.is_file():
                raise FetchError(f"{archive}: no such file{_advice(url)}")
            digest = file_sha256(archive)
            if sha256 and digest != sha256.lower():
                raise FetchError(f"{source}: sha256 is {digest}, but data.sha256 in params.yaml expects "
                                 f"{sha256}; the file is corrupt or not the one configured{_advice(url)}")
            root = extract(archive, work / "tree")
        files = sum(1 for p in root.rglob("*") if p.is_file())
        check_layout(root, source, url)
        info = {"url": url, "source": source, "sha256": digest, "files": files}
        with signals_deferred():
            swap_in(root, out_dir)
            if record is not None:
                write_json(record, info)
    return info


# A folder or file this user may not write (or read), or a read-only disk: no attempt mends it.
_ACCESS_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


@contextlib.contextmanager
def _access_message(out_dir: Path) -> Iterator[None]:
    """Turn a refused read or write into a FetchError saying which path and what to do."""
    try:
        yield
    except OSError as err:
        if err.errno not in _ACCESS_DENIED:
            raise
        raise FetchError(f"{out_dir}: {err.strerror}: {err.filename}; nothing was changed. fetch reads "
                         f"data.url's source and writes a temporary copy in {out_dir.parent}: let this user "
                         f"read the one and write in the other (`ls -ld {out_dir.parent}` shows its owner "
                         f"and mode), or run the stage in a copy of the project it can write") from None


# Seconds to wait before each further attempt: a dropped connection, a timeout or a 5xx is often
# gone a moment later. A 4xx is not: it fails at once.
RETRY_DELAYS = (1.0, 3.0, 9.0)


class _Transient(Exception):
    """A fault worth another attempt; its message says what happened."""


def download(source: str, dest: Path, url: str) -> Path:
    """Stream `source` to `dest` with a progress bar, trying again after transient faults;
    FetchError on an HTTP error, or once the attempts are spent."""
    for attempt, delay in enumerate((*RETRY_DELAYS, None), start=1):
        try:
            return _download_once(source, dest, url)
        except _Transient as err:
            if delay is None:
                raise FetchError(f"{source}: {err} ({attempt} attempts){_advice(url)}") from None
            print(f"{source}: {err}; trying again in {delay:.0f} s ({attempt} of {len(RETRY_DELAYS) + 1})",
                  file=sys.stderr, flush=True)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _download_once(source: str, dest: Path, url: str) -> Path:
    """One attempt. Only the network's faults are _Transient: a write that fails here (a full disk,
    a folder this user may not write) propagates at once, since another attempt cannot mend it."""
    with _network_faults(source, url):
        response = urllib.request.urlopen(source, timeout=60)
    with response, open(dest, "wb") as f, tqdm(total=_length(response), unit="B", unit_scale=True,
                                               desc=f"download {dest.name}", disable=None) as bar:
        while True:
            with _network_faults(source, url):
                chunk = response.read(1 << 20)
            if not chunk:
                break
            f.write(chunk)
            bar.update(len(chunk))
    expected, received = _length(response), dest.stat().st_size
    if expected is not None and received != expected:
        raise _Transient(f"download cut off after {received} of {expected} bytes")
    return dest


def _length(response) -> int | None:
    return int(response.headers.get("Content-Length") or 0) or None


@contextlib.contextmanager
def _network_faults(source: str, url: str) -> Iterator[None]:
    """Around a call that talks to the server: a dropped connection, a timeout, a 5xx or a 429 is
    _Transient; any other HTTP status a FetchError at once."""
    try:
        yield
    except urllib.error.HTTPError as err:
        if err.code >= 500 or err.code == 429:  # the server's trouble, or "slow down"
            raise _Transient(f"HTTP {err.code} {err.reason}") from None
        raise FetchError(f"{source}: HTTP {err.code} {err.reason}{_advice(url)}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise _Transient(f"download failed ({getattr(err, 'reason', err)})") from None


def _advice(url: str) -> str:
    return (f".\n  Nothing was changed. data.url in params.yaml is {url}; set it to a local copy "
            f"(path or file:// URL, archive or ImageFolder folder), or set {MIRROR_ENV} to a folder "
            f"or URL prefix holding a file of the same name.")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def extract(archive: Path, dest: Path) -> Path:
    """Extract a zip or tar archive into `dest`, refusing entries that would land outside it.

    Returns the dataset root: `dest`, or its single top-level folder (archives usually have one).
    """
    dest.mkdir(parents=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            _refuse_unsafe(archive, [(i.filename, (i.external_attr >> 16) & 0o170000 == 0o120000)
                                     for i in zf.infolist()])
            zf.extractall(dest)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            _refuse_unsafe(archive, [(m.name, m.issym() or m.islnk()) for m in tar.getmembers()])
            # The standard library's own guard as a second line, where it has one (3.10.12, 3.11.4 on).
            tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    else:
        raise FetchError(f"{archive}: not a zip or tar archive (nor a folder); check data.url")
    entries = [p for p in dest.iterdir() if p.name not in _IGNORED_TOP_LEVEL and not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


def _refuse_unsafe(archive: Path, entries: list[tuple[str, bool]]) -> None:
    """FetchError before anything is written if any (name, is_link) entry could land outside."""
    for name, is_link in entries:
        problem = _unsafe_entry(name.replace("\\", "/"), is_link)
        if problem:
            raise FetchError(f"{archive}: unsafe entry refused: {name!r} {problem}; nothing was "
                             f"extracted. Use an archive whose entries stay inside its folder")


def _unsafe_entry(name: str, is_link: bool) -> str | None:
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "climbs out of the folder with '..'"
    if is_link:
        return "is a link (an image dataset needs none)"
    return None


LAYOUTS = ("one sub-folder per class (e.g. cats/, dogs/), or train/ and val/ folders each holding the "
           "same class sub-folders (the tutorial's layout)")


def check_layout(root: Path, source: str, url: str) -> None:
    """FetchError unless `root` holds files inside at least one sub-folder (the class folders)."""
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not any(p.is_file() for folder in folders for p in folder.rglob("*")):
        found = "is empty" if not any(root.iterdir()) else "holds no files inside sub-folders"
        raise FetchError(f"{source} {found}: there are no class folders of images. data.url must "
                         f"point at images in {LAYOUTS}{_advice(url)}")
