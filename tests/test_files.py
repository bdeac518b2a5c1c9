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
from transferlab.stages import Interrupted, _interrupt, run_stage


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
target = Path(sys.argv[1])
new = target.with_name("new")
new.mkdir()
(new / "f").write_text("new")
files.swap_in(new, target)
"""


def test_a_swap_that_died_between_its_renames_is_undone_by_the_next_run(tmp_path):
    target = tmp_path / "logs"
    target.mkdir()
    (target / "f").write_text("old")
    died = subprocess.run([sys.executable, "-c", CRASH_BETWEEN_RENAMES, str(target)])
    assert died.returncode == 9 and not target.exists()  # the gap the fallback leaves
    remove_stale_temps(tmp_path)
    assert (target / "f").read_text() == "old"  # the old folder is back, not deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "new"]


@pytest.fixture
def stage_handlers():
    """run_stage installs its own SIGINT and SIGTERM handlers: pytest's come back afterwards."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("output", ["plots/", "logs/finetune/", "curves/plots/"])
def test_every_stage_first_puts_back_a_folder_that_a_dead_swap_parked(tmp_path, monkeypatch, capfd,
                                                                       stage_handlers, output):
    """A crash between swap_in's two renames leaves the output folder parked; run_stage, which
    every stage runs through, puts it back before the stage's main looks for it."""
    monkeypatch.chdir(tmp_path)
    target = tmp_path / output
    target.mkdir(parents=True)
    (target / "f").write_text("old")
    died = subprocess.run([sys.executable, "-c", CRASH_BETWEEN_RENAMES, str(target)])
    assert died.returncode == 9 and not target.exists()
    seen = []
    run_stage("plot", lambda: seen.append((target / "f").read_text()), ["metrics/eval.json", output])
    assert seen == ["old"]
    assert f"{output.rstrip('/')}: put back the previous version" in capfd.readouterr().err
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([target.name, "new"])


def test_a_stage_removes_the_dead_writers_temporary_files_of_its_outputs_alone(tmp_path, monkeypatch,
                                                                                stage_handlers):
    monkeypatch.chdir(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "print(__import__('os').getpid())"], capture_output=True,
                          text=True).stdout.strip()
    ours = [f".eval.json.{dead}.{i}.tmp" for i in range(3)]
    kept = [f".eval.json.{os.getpid()}.0.tmp"] + [f".report.json.{dead}.{i}.tmp" for i in range(3)]
    for name in ours + kept:
        (tmp_path / name).write_text("half")
    run_stage("evaluate", lambda: None, ["eval.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)  # a live writer's, another output's


@pytest.mark.parametrize("exchange", [True, False])
def test_a_replaced_folder_keeps_its_mode_setgid_included_and_its_group(tmp_path, monkeypatch, exchange):
    """A shared project's folder is 02775 (group-writable, its files inheriting its group): a run
    that replaces it keeps that, with renameat2 or without."""
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    target = tmp_path / "logs"
    target.mkdir()
    target.chmod(0o2775)
    group = another_group()
    if group is not None:
        os.chown(target, -1, group)
    with atomic_dir(target) as tmp:
        (tmp / "a.tsv").write_text("x")
    assert stat.S_IMODE(target.stat().st_mode) == 0o2775 and (target / "a.tsv").read_text() == "x"
    if group is not None:
        assert target.stat().st_gid == group


def another_group() -> int | None:
    """A group this user may give a folder, other than its own (any, for root)."""
    if os.geteuid() == 0:
        return 4242
    return next((g for g in os.getgroups() if g != os.getegid()), None)


def test_a_new_folder_in_a_setgid_folder_is_setgid_as_mkdir_makes_it(tmp_path):
    shared = tmp_path / "project"
    shared.mkdir()
    shared.chmod(0o2775)
    previous = os.umask(0o022)
    try:
        with atomic_dir(shared / "plots") as tmp:
            (tmp / "a.png").write_bytes(b"x")
        (shared / "by-mkdir").mkdir()
    finally:
        os.umask(previous)
    assert stat.S_IMODE((shared / "plots").stat().st_mode) == stat.S_IMODE((shared / "by-mkdir").stat().st_mode)
    assert stat.S_IMODE((shared / "plots").stat().st_mode) == 0o2755


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
