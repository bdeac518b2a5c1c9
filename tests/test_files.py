"""files.py: outputs replaced all together, folders swapped without a gap, permissions as open() gives."""
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from transferlab import files
from transferlab.files import atomic_dir, atomic_path, remove_stale_temps, replaced_together
from transferlab.stages import Interrupted, _interrupt


def test_a_signal_from_another_thread_waits_until_every_output_is_replaced(tmp_path, monkeypatch):
    """The kernel may hand SIGTERM to any thread (torch's, tqdm's): it must still wait for the swap."""
    first, second = tmp_path / "model.pt", tmp_path / "metrics.json"
    first.write_text("old")
    second.write_text("old")
    previous = signal.signal(signal.SIGTERM, _interrupt)  # what run_stage installs
    real_replace, calls = os.replace, []

    def replace_slowly(src, dst):  # the swap held open: a signal sent now lands between the renames
        calls.append(dst)
        real_replace(src, dst)
        if len(calls) == 1:
            sender = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM))
            sender.start()
            sender.join()
            time.sleep(0.2)  # time for the main thread to run a Python handler, were one to run
    monkeypatch.setattr(files.os, "replace", replace_slowly)
    try:
        with pytest.raises(Interrupted):
            with replaced_together(str(first), str(second)) as (new_first, new_second):
                new_first.write_text("new")
                new_second.write_text("new")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(calls) == 2
    assert (first.read_text(), second.read_text()) == ("new", "new")  # both, then the interruption


def test_a_folder_is_swapped_in_one_step_on_linux(tmp_path, monkeypatch):
    target = tmp_path / "logs"
    target.mkdir()
    (target / "old.tsv").write_text("old")
    renames = []
    monkeypatch.setattr(files.os, "replace", lambda *a: renames.append(a))  # must not be needed
    with atomic_dir(target) as tmp:
        (tmp / "new.tsv").write_text("new")
    if sys.platform == "linux":
        assert renames == [] and [p.name for p in tmp_path.iterdir()] == ["logs"]
        assert [p.name for p in target.iterdir()] == ["new.tsv"]


CRASH_BETWEEN_RENAMES = """
import os, sys
from pathlib import Path
from transferlab import files
files._exchange = lambda a, b: False  # a system without renameat2
real = os.replace
def replace_then_die(src, dst):
    real(src, dst)
    os._exit(9)  # the machine dies after the first rename: the target is gone
files.os.replace = replace_then_die
new = Path(sys.argv[1]) / "new"
new.mkdir()
(new / "f").write_text("new")
files.swap_in(new, Path(sys.argv[1]) / "logs")
"""


def test_a_swap_that_died_between_its_renames_is_undone_by_the_next_run(tmp_path):
    target = tmp_path / "logs"
    target.mkdir()
    (target / "f").write_text("old")
    died = subprocess.run([sys.executable, "-c", CRASH_BETWEEN_RENAMES, str(tmp_path)])
    assert died.returncode == 9 and not target.exists()  # the gap the fallback leaves
    remove_stale_temps(tmp_path)
    assert (target / "f").read_text() == "old"  # the old folder is back, not deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "new"]


def test_outputs_are_as_readable_as_the_umask_says(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "metrics.json") as tmp:
            tmp.write_text("{}")
        with atomic_dir(tmp_path / "logs") as tmp:
            (tmp / "a.tsv").write_text("x")
        os.umask(0o077)
        with atomic_path(tmp_path / "private.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(previous)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "metrics.json") == 0o644
    assert mode(tmp_path / "logs") == 0o755
    assert mode(tmp_path / "private.json") == 0o600
