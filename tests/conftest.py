"""Shared fixtures: generated images, a copy of the project, torch caches with test weights."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# No test reaches a model hub: timm's weights come from files and caches the tests write. Set
# before anything imports huggingface_hub, which reads it once.
os.environ["HF_HUB_OFFLINE"] = "1"

# The modules that take longest, longest first (pytest --durations): `make test` hands whole
# modules to its workers in this order, so that the short ones fill the gaps at the end rather
# than one long module running alone while the other cores idle.
LONGEST_FIRST = ["test_real_data.py", "test_readme_commands.py", "test_remote.py", "test_stages.py",
                 "test_distributed.py", "test_pipeline.py", "test_curves.py", "test_export.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as collected


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test` runs one worker per core), keep this worker, and every
    process it starts, to its own share of the cores. torch sizes its thread pool, and the decode
    its pool, by the cores a process may use: without this, two workers' stage processes would each
    use every core and contend (two tiny pipelines at once took 69 s here, against 41 s so kept)."""
    worker, workers = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not (worker and workers and hasattr(os, "sched_setaffinity")):
        return
    cores, count, index = sorted(os.sched_getaffinity(0)), int(workers), int(worker.removeprefix("gw"))
    if len(cores) >= count:
        mine = cores[index::count]
        os.sched_setaffinity(0, mine)
        torch.set_num_threads(len(mine))  # this process's pool was sized before


# Files a copy of the project needs to run the pipeline (what git tracks, minus outputs).
PROJECT_FILES = ["dvc.yaml", "params.yaml", "curves/pipeline.yaml", "curves/params.yaml", "pyproject.toml", "src",
                 ".dvc/config", ".dvc/.gitignore", ".dvc/plots", ".dvcignore", ".gitignore"]


def make_image(path: Path, color: tuple[int, int, int], seed: int, size: tuple[int, int] = (48, 40)) -> Path:
    """A noisy image around `color`: classes of different colours are trivially separable."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


CLASS_COLORS = {"ants": (200, 60, 40), "bees": (40, 80, 200)}


def make_dataset(root: Path, train_per_class: int = 10, val_per_class: int = 4) -> Path:
    """An ImageFolder tree in the tutorial's layout: root/{train,val}/{ants,bees}/*.jpg."""
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, (name, color) in enumerate(CLASS_COLORS.items()):
            for i in range(count):
                make_image(root / split / name / f"{name}_{i:03d}.jpg", color, seed=hash((split, c, i)) % 2**31)
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "tiny")


def write_test_weights(torch_home: Path, arch: str) -> Path:
    """Save a random-init state dict where torchvision looks for `arch`'s ImageNet weights
    when TORCH_HOME is `torch_home`: hub/checkpoints/<file name of the weights' URL>."""
    from torchvision.models import get_model, get_model_weights

    url = get_model_weights(arch).DEFAULT.url
    path = torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(get_model(arch, weights=None).state_dict(), path)
    return path


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, private torch cache (TORCH_HOME) for this test."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def copy_project(dest: Path) -> Path:
    """The project's files in a fresh git + DVC repo at `dest`, as a user's clone would be."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "project"], cwd=dest, check=True)
    return dest


# One cache folder (decoded images, embeddings, hardware decisions) for the pipelines the tests run,
# as a user's projects would share one through TRANSFERLAB_CACHE_DIR: each hardware decision is
# measured once per test session, not once per test. Set by session_temp.
SHARED_CACHE: Path | None = None


@pytest.fixture(scope="session", autouse=True)
def session_temp(tmp_path_factory: pytest.TempPathFactory):
    """Every temporary file of the session, the tools' own included (torchrun's, the rendezvous,
    DVC's per-repository state otherwise in /var/tmp/dvc), under pytest's base folder, which
    pytest deletes after a passing run (pyproject.toml's tmp_path_retention_policy): a suite that
    leaks gigabytes into /tmp fills the disk it runs on."""
    global SHARED_CACHE
    SHARED_CACHE = tmp_path_factory.mktemp("transferlab-cache")
    tmp = tmp_path_factory.mktemp("tmp")
    with pytest.MonkeyPatch.context() as patch:  # undone at the session's end
        patch.setenv("TMPDIR", str(tmp))
        patch.setattr(tempfile, "tempdir", str(tmp))
        patch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path_factory.mktemp("dvc-site-cache")))
        yield


def pipeline_env(torch_home: Path | None = None, **extra: str) -> dict[str, str]:
    """Environment for `dvc` subprocesses: this interpreter's tools first on PATH, no analytics."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["PYTHONPATH"] = str(ROOT / "src")
    assert SHARED_CACHE is not None, "pipeline_env runs inside a test session"
    env["TRANSFERLAB_CACHE_DIR"] = str(SHARED_CACHE)
    if torch_home is not None:
        env["TORCH_HOME"] = str(torch_home)
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    """Run a command, echoing its output when it fails so the test log shows why."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n--- stdout\n{result.stdout}\n"
                             f"--- stderr\n{result.stderr}")
    return result


# Precision, layout and input path as a test pins them: `auto` measures candidates, which only the
# tests of `auto` should pay for (tests/test_hardware.py, and test_pipeline's end-to-end run), and
# two runs a test compares must not differ by what a timing decided.
PINNED_HARDWARE = {"precision": "fp32", "channels_last": False, "tensor_batches": True}


# The keys with which params.yaml gives a mode a recipe of its own (scratch's longer cap, extract's
# lr range test): in a test's tiny project every mode trains as its `train` says, so that a run
# takes seconds and a test sets the one key it is about. tests/test_real_data.py runs the recipes.
MODE_RECIPE = ("epochs", "patience", "min_epochs", "optimizer", "lr", "weight_decay", "scheduler", "augment",
               "label_smoothing")


def modes_follow_train(params: dict) -> None:
    for mode in ("finetune", "extract", "scratch"):
        for key in MODE_RECIPE:
            if key in params[mode]:
                params[mode][key] = None


def tiny_project(root: Path, archs: tuple[str, ...] = ("squeezenet1_0",), **train) -> tuple[Path, dict[str, str]]:
    """A user's clone at root/project pointed at a generated tutorial-layout dataset (16 train and
    val, 8 test images), with `train` params set (fp32, plain layout unless given) and random
    weights for `archs` in a private TORCH_HOME; and the environment to run its pipeline in."""
    data = make_dataset(root / "tiny", train_per_class=8, val_per_class=4)
    project = copy_project(root / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["url"] = str(data)
    params["train"].update({**PINNED_HARDWARE, **train})
    modes_follow_train(params)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for arch in archs:
        write_test_weights(root / "torch_home", arch)
    return project, pipeline_env(root / "torch_home")


@pytest.fixture(scope="session")
def finished_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A tiny project whose whole pipeline ran once (squeezenet, 2 epochs), committed: the user's
    last good run. Built once per test session; a test that changes it works on `copy_finished`."""
    project, env = tiny_project(tmp_path_factory.mktemp("finished"), epochs=2, batch_size=4)
    (project.parent / "repro.log").write_text(run(["dvc", "repro"], project, env).stdout)  # what it printed
    git_commit(project, "last good run")
    return project, env


def copy_finished(finished: tuple[Path, dict[str, str]], dest: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the finished project at `dest` (git history, DVC cache, outputs), as a second
    clone of the user's repository would be; DVC's own temporary state is left behind."""
    project, env = finished
    def dvc_tmp(folder: str, names: list[str]) -> list[str]:
        return ["tmp"] if Path(folder) == project / ".dvc" else []
    shutil.copytree(project, dest, symlinks=True, ignore=dvc_tmp)
    return dest, dict(env)


def git_commit(project: Path, message: str) -> None:
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(git + ["add", "-A"], cwd=project, check=True)
    subprocess.run(git + ["commit", "-qm", message], cwd=project, check=True)


def start_queue(project: Path, env: dict[str, str], jobs: int) -> None:
    """`dvc queue start -j jobs`, returning when it does: its workers are daemons that inherit its
    stdout, so reading that to its end (as `run` does) would wait for the last worker to exit."""
    with tempfile.TemporaryFile("w+") as log:
        result = subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], cwd=project, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        log.seek(0)
        assert result.returncode == 0, f"dvc queue start exited {result.returncode}\n{log.read()}"


def wait_for_queue(project: Path, env: dict[str, str], timeout: float = 900) -> str:
    """Wait until `dvc queue` has nothing queued or running; stop its workers; its last status."""
    deadline = time.time() + timeout
    while True:
        # While a worker writes a task's info file, `dvc queue status` can read it half-written and
        # exit 255 ("Expecting value: line 1 column 1"): DVC's race, so it is asked again.
        result = run(["dvc", "queue", "status"], project, env, check=False)
        status = result.stdout
        if result.returncode == 0 and "Queued" not in status and "Running" not in status:
            break
        if time.time() > deadline:
            raise AssertionError(f"the queue did not finish in {timeout:.0f} s; dvc queue status exited "
                                 f"{result.returncode}:\n{status}{result.stderr}")
        time.sleep(1)
    run(["dvc", "queue", "stop"], project, env)  # its workers would otherwise idle on after the test
    stop_workers(project)
    for line in status.splitlines():  # a failed task's own log, so that an assertion on status says why
        if line.split()[-1:] == ["Failed"]:
            task = line.split()[0]  # its id: a task that failed during DVC's setup may have no name
            logs = run(["dvc", "queue", "logs", task], project, env, check=False)
            status += f"\n--- {task}\n{logs.stdout}{logs.stderr}"
    return status


def stop_workers(project: Path, grace: float = 30) -> None:
    """Wait for the queue's worker processes to exit; kill those still there after `grace` seconds.
    A worker whose "empty queue" shutdown came while its task ran may never exit (celery, under
    dvc-task; one here idled 7 minutes until killed), every task done: it holds nothing a test reads."""
    pids = [int(text) for f in (project / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.pid")
            if (text := f.read_text().strip()).isdigit()]
    deadline = time.time() + grace
    while pids and time.time() < deadline:
        pids = [pid for pid in pids if is_dvc_process(pid)]
        time.sleep(0.5)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def is_dvc_process(pid: int) -> bool:
    try:
        return b"dvc" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone
        return False


def interrupt(command: list[str], cwd: Path, env: dict[str, str], at_line: str,
              signum: int = signal.SIGTERM, group: bool = False) -> tuple[int, str]:
    """Run `command`, send it `signum` once it prints a line starting with `at_line`; (exit code, stderr).
    group=True signals its whole process group, as a terminal's Ctrl-C does (dvc and the stage it runs)."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=group)
    for line in process.stdout:
        if line.startswith(at_line):
            if group:
                os.killpg(process.pid, signum)
            else:
                process.send_signal(signum)
            break
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr
