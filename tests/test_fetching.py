import errno
import hashlib
import http.server
import io
import json
import os
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
from conftest import make_dataset

from transferlab import fetching
from transferlab.fetching import MIRROR_ENV, FetchError, fetch, resolve_source
from transferlab.files import DiskFullError


def zip_folder(folder: Path, archive: Path, top: str = "hymenoptera_data") -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, f"{top}/{path.relative_to(folder).as_posix()}")
    return archive


@pytest.fixture
def archive(tmp_path) -> Path:
    return zip_folder(make_dataset(tmp_path / "src", 3, 2), tmp_path / "hymenoptera_data.zip")


def test_zip_is_extracted_without_its_top_folder_and_recorded(tmp_path, archive):
    record = tmp_path / "data" / "fetch.json"
    info = fetch(str(archive), tmp_path / "data" / "raw", record=record)
    raw = tmp_path / "data" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == ["train", "val"]
    assert info == {"url": str(archive), "source": str(archive),
                    "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(), "files": 10}
    assert json.loads(record.read_text()) == info
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["fetch.json", "raw"]  # no temporary left


@pytest.mark.parametrize("layout", ["empty", "files only", "empty class folders"])
def test_a_folder_without_class_folders_of_files_is_refused(tmp_path, layout):
    source = tmp_path / "mine"
    source.mkdir()
    if layout == "files only":
        (source / "photo.jpg").write_bytes(b"x")
    if layout == "empty class folders":
        (source / "cats").mkdir()
        (source / "dogs").mkdir()
    words = "no class folders of images.*one sub-folder per class.*train/ and val/"
    with pytest.raises(FetchError, match=words) as err:
        fetch(str(source), tmp_path / "raw")
    assert "data.url in params.yaml is" in str(err.value)
    assert not (tmp_path / "raw").exists()


def test_file_url_tar_and_folder_sources(tmp_path, archive):
    fetch(archive.as_uri(), tmp_path / "a")
    tarball = tmp_path / "data.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "src", arcname="dataset")
    fetch(str(tarball), tmp_path / "b")
    info = fetch(str(tmp_path / "src"), tmp_path / "c")
    for out in "abc":
        assert sorted(p.name for p in (tmp_path / out).iterdir()) == ["train", "val"]
    assert info["sha256"] is None and info["files"] == 10


def test_mirror_replaces_the_url_folder_keeps_the_file_name(tmp_path, archive):
    url = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
    assert resolve_source(url, None) == url
    assert resolve_source(url, str(tmp_path)) == str(tmp_path / "hymenoptera_data.zip")
    assert resolve_source(url, "https://mirror.example/data/") == "https://mirror.example/data/hymenoptera_data.zip"
    assert fetch(url, tmp_path / "raw", mirror=str(tmp_path))["files"] == 10


def unsafe_zip(path: Path, name: str, symlink: bool = False) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("data/train/ants/ok.txt", "fine")
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd" if symlink else "escaped")
    return path


@pytest.mark.parametrize("name, symlink, words", [
    ("../evil.txt", False, "climbs out"),
    ("data/../../evil.txt", False, "climbs out"),
    ("/tmp/evil.txt", False, "absolute path"),
    ("data/link", True, "is a link"),
])
def test_unsafe_zip_entries_are_refused_and_nothing_is_written(tmp_path, name, symlink, words):
    archive = unsafe_zip(tmp_path / "bad.zip", name, symlink)
    out = tmp_path / "work" / "data" / "raw"
    with pytest.raises(FetchError, match=f"unsafe entry refused.*{words}"):
        fetch(str(archive), out)
    assert not out.exists() and list((tmp_path / "work" / "data").iterdir()) == []
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "work" / "evil.txt").exists()


@pytest.mark.parametrize("member", ["../evil.txt", "/abs/evil.txt", "link"])
def test_unsafe_tar_entries_are_refused(tmp_path, member):
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo(member)
        if member == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
            tar.addfile(info)
            info = tarfile.TarInfo("link/evil.txt")  # writes through the link if it were followed
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(FetchError, match="unsafe entry refused"):
        fetch(str(archive), tmp_path / "data" / "raw")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "data" / "raw").exists()


def test_checksum_mismatch_keeps_the_previous_copy(tmp_path, archive):
    out = tmp_path / "raw"
    good = hashlib.sha256(archive.read_bytes()).hexdigest()
    fetch(str(archive), out, sha256=good)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(FetchError, match=f"sha256 is {good}, but data.sha256 in params.yaml expects"):
        fetch(str(archive), out, sha256="0" * 64)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_not_an_archive_and_missing_file(tmp_path):
    (tmp_path / "notes.zip").write_text("plain text")
    with pytest.raises(FetchError, match="not a zip or tar archive"):
        fetch(str(tmp_path / "notes.zip"), tmp_path / "raw")
    with pytest.raises(FetchError, match="no such file"):
        fetch(str(tmp_path / "missing.zip"), tmp_path / "raw")


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""
    requests: list[str] = []

    def do_GET(self):
        self.requests.append(self.path)
        if self.path.endswith("/missing.zip"):
            self.send_error(404, "Not Found")
            return
        if self.path.endswith("/busy.zip"):
            self.send_error(503, "Service Unavailable")
            return
        self.send_response(200)
        first_try = self.requests.count(self.path) == 1
        cut = self.path.endswith("/cut.zip") or (self.path.endswith("/flaky.zip") and first_try)
        declared = len(self.payload) * (2 if cut else 1)
        self.send_header("Content-Length", str(declared))
        self.end_headers()
        self.wfile.write(self.payload)  # for cut.zip: half of what was promised, then close

    def log_message(self, *args):
        pass


@pytest.fixture
def server(archive, monkeypatch):
    monkeypatch.setattr(fetching, "RETRY_DELAYS", (0.0, 0.0, 0.0))
    _Handler.payload, _Handler.requests = archive.read_bytes(), []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_over_http(tmp_path, server):
    info = fetch(f"{server}/data/hymenoptera_data.zip", tmp_path / "raw")
    assert info["files"] == 10


@pytest.mark.parametrize("name, words", [("missing.zip", "HTTP 404"), ("cut.zip", "cut off after")])
def test_http_faults_name_the_url_and_mirror_and_change_nothing(tmp_path, server, archive, name, words):
    out = tmp_path / "raw"
    fetch(str(archive), out)
    url = f"{server}/data/{name}"
    with pytest.raises(FetchError) as err:
        fetch(url, out)
    assert words in str(err.value) and url in str(err.value) and MIRROR_ENV in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    fetch(f"{server}/data/hymenoptera_data.zip", out)  # the re-run recovers by itself


def test_a_download_that_drops_once_is_tried_again(tmp_path, server, capfd):
    info = fetch(f"{server}/data/flaky.zip", tmp_path / "raw")
    assert info["files"] == 10 and _Handler.requests == ["/data/flaky.zip"] * 2
    err = capfd.readouterr().err
    assert "download cut off after" in err and "trying again in 0 s (1 of 4)" in err


@pytest.mark.parametrize("name, attempts, words", [("missing.zip", 1, "HTTP 404"), ("busy.zip", 4, "HTTP 503"),
                                                   ("cut.zip", 4, "cut off after")])
def test_only_transient_faults_are_tried_again_and_a_few_times(tmp_path, server, name, attempts, words):
    with pytest.raises(FetchError, match=words):
        fetch(f"{server}/data/{name}", tmp_path / "raw")
    assert len(_Handler.requests) == attempts


def test_no_network_at_all(tmp_path, monkeypatch):
    monkeypatch.setattr(fetching, "RETRY_DELAYS", (0.0,))
    with pytest.raises(FetchError, match="download failed"):
        fetch("http://127.0.0.1:9/hymenoptera_data.zip", tmp_path / "raw")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code, error, words", [
    (errno.ENOSPC, DiskFullError, r"raw: no space left on .*nothing was written\. Free some space there"),
    (errno.EACCES, FetchError, r"raw: Permission denied: .*download; nothing was changed\..*write in the other"),
    (errno.EROFS, FetchError, r"raw: Read-only file system: .*download; nothing was changed"),
])
def test_a_local_write_failure_is_not_tried_again_and_keeps_the_previous_copy(
        tmp_path, server, archive, monkeypatch, capfd, code, error, words):
    """Writing the downloaded file fails here, not on the network: no attempt mends a full disk or
    a folder this user may not write, so one request, the disk or permission message at once, and
    data/raw as it was, with nothing half-written beside it."""
    if code == errno.ENOSPC and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here (Linux's always-full device)")
    out = tmp_path / "data" / "raw"
    fetch(str(archive), out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def open_refused(file, mode="r", *args, **kwargs):  # the download's file alone
        if Path(file).name != "download" or "w" not in mode:
            return open(file, mode, *args, **kwargs)
        if code == errno.ENOSPC:
            return open("/dev/full", mode, *args, **kwargs)  # the kernel's own ENOSPC, on a real write
        raise OSError(code, os.strerror(code), str(file))
    monkeypatch.setattr(fetching, "open", open_refused, raising=False)
    with pytest.raises(error, match=words):
        fetch(f"{server}/data/hymenoptera_data.zip", out)
    assert len(_Handler.requests) == 1 and "trying again" not in capfd.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["raw"]  # no temporary left
