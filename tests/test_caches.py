import os
import subprocess
import sys
import time

import pytest
from conftest import make_image
from filelock import FileLock

from transferlab.caches import entries, prune
from transferlab.images import Sample
from transferlab.store import open_store


def test_entries_by_kind_and_pruning_by_last_use(tmp_path):
    cache = tmp_path / "cache"
    samples = [Sample(str(make_image(tmp_path / f"{i}.jpg", (9, 9, 9), i)), "a") for i in range(3)]
    old = open_store(samples, 30, cache).folder
    recent = open_store(samples, 20, cache).folder
    (cache / "hardware").mkdir()
    (cache / "hardware" / "decision-x.json").write_text("{}")
    long_ago = time.time() - 40 * 86400
    os.utime(old, (long_ago, long_ago))
    found = {e.path.name: e for e in entries(cache)}
    assert {e.kind for e in found.values()} == {"decoded images", "hardware decisions"}
    assert found[old.name].bytes == (old / "pixels.bin").stat().st_size + (old / "index.npy").stat().st_size
    assert [e.path for e in prune(cache, 30)] == [old]
    assert recent.exists() and not old.exists()
    open_store(samples, 20, cache)  # opening marks it used: a prune by age keeps it
    assert prune(cache, 1) == []


def test_prune_skips_an_entry_being_built(tmp_path):
    cache = tmp_path / "cache"
    busy = cache / "decoded-20px-abc"
    busy.mkdir(parents=True)
    with FileLock(str(busy) + ".lock"):
        assert prune(cache, 0) == []
    lock_file = cache / "decoded-20px-abc.lock"
    inode = lock_file.stat().st_ino
    assert [e.path for e in prune(cache, 0)] == [busy]
    # The lock file is the one every process locks, before and after: never unlinked, never replaced.
    assert lock_file.stat().st_ino == inode


@pytest.mark.integration
def test_cache_command_reports_and_prunes(tmp_path):
    cache = tmp_path / "cache"
    open_store([Sample(str(make_image(tmp_path / "x.jpg", (9, 9, 9), 0)), "a")], 20, cache)
    env = {**os.environ, "TRANSFERLAB_CACHE_DIR": str(cache)}
    command = [os.path.join(os.path.dirname(sys.executable), "transferlab"), "cache"]
    shown = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    assert "decoded images" in shown and "total" in shown
    pruned = subprocess.run(command + ["--prune", "0"], env=env, capture_output=True, text=True, check=True).stdout
    assert "removed 1 entries" in pruned and [p.suffix for p in cache.glob("decoded-*")] == [".lock"]
