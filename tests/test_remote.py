"""Sharing work between machines with DVC's own engines: an S3-compatible remote (moto's server on
loopback, a real S3 wire protocol) for data and models, a git remote (a bare repository on disk)
for code, metrics and experiments. Machine A runs a sweep (DVC's queue, two at once) and ranks it;
machine B pulls, runs nothing, and ranks it alike."""
import csv
import hashlib
import io
import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import copy_finished, git_commit, run, start_queue, wait_for_queue

pytestmark = pytest.mark.integration  # through the real tools (make test-integration)

moto_server = pytest.importorskip("moto.server", reason="moto[server] is a test dependency (pip install -e '.[test]')")
boto3 = pytest.importorskip("boto3")

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in CREDENTIALS.items()
                                                 if k != "AWS_DEFAULT_REGION"},
                 region_name="us-east-1").create_bucket(Bucket="team")
    yield endpoint
    server.stop()


def digests(project: Path, outputs: list[str]) -> dict[str, str]:
    files = {}
    for output in outputs:
        path = project / output
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            files[file.relative_to(project).as_posix()] = hashlib.md5(file.read_bytes()).hexdigest()
    return files


def run_sweep(project: Path, env: dict[str, str], tmp_path: Path) -> list[dict]:
    """The README's sweep: two seeds through `dvc exp run --queue` and `dvc queue start -j 2` (a
    task DVC's race failed, again with `dvc exp run --temp`, as docs/reliability.md says); then
    `transferlab compare` reads them and the baseline from git."""
    run(["dvc", "exp", "run", "--queue", "-S", "seed=1,2"], project, env)
    start_queue(project, env, jobs=2)
    status = wait_for_queue(project, env)
    # DVC's own race between workers (treeverse/dvc#10673, open) can fail a task while DVC sets it
    # up, before any stage runs; such a task is run again, alone. A failure of ours fails the test.
    failures = status.split("\n--- ")[1:]
    assert all("failed during setup" in log for log in failures), status
    rows = list(csv.DictReader(io.StringIO(run(["dvc", "exp", "show", "--csv"], project, env).stdout)))
    # Which finished: the queue's status names them (`exp show`'s State column once lagged behind it).
    succeeded = {line.split()[1] for line in status.splitlines() if line.split()[-1:] == ["Success"]}
    done = {r["seed"] for r in rows if r["State"] == "Success" or r.get("Experiment") in succeeded}
    for seed in {"1", "2"} - done:
        run(["dvc", "exp", "run", "--temp", "-S", "model=squeezenet", "-S", f"seed={seed}"], project, env)
    assert len(done) + len(failures) == 2, status
    stores = [p for p in (project / "data/cache").glob("decoded-*") if p.is_dir()]
    assert len(stores) == 1  # one decode, shared by the experiments

    out = run(["transferlab", "compare", "--out", str(tmp_path / "board")], project, env).stdout
    rows = json.loads((tmp_path / "board" / "leaderboard.json").read_text())
    # The baseline's seed 42 and the experiments' 1 and 2 pool into one row per mode.
    assert {(r["model"], r["mode"]): r["seeds"] for r in rows} == {
        ("squeezenet", mode): 3 for mode in ("finetune", "extract", "scratch")}
    assert sum(r["best"] for r in rows) == 1 and rows[0]["best"]
    # Three seeds a row: the verdicts count the seeds' spread (not McNemar's one-run test), Holm-adjusted.
    assert all(r["test"] == "two-level t" and r["p_value"] >= r["p_unadjusted"] for r in rows[1:])
    assert (tmp_path / "board" / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"
    assert "| **best** |" in (tmp_path / "board" / "leaderboard.md").read_text() and "**best**" in out
    return rows


def test_a_sweep_queued_two_at_once_is_ranked_pushed_and_ranked_alike_on_another_machine(
        finished_project, tmp_path, s3_endpoint):
    # Machine A: a finished pipeline and a remote for data and models; a sweep, ranked; all pushed.
    a, env = copy_finished(finished_project, tmp_path / "machine-a")
    del env["TRANSFERLAB_CACHE_DIR"]  # the default: the project's data/cache, shared by the queue's copies
    env.update(CREDENTIALS)
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    run(["dvc", "remote", "add", "-d", "storage", "s3://team/transferlab"], a, env)
    run(["dvc", "remote", "modify", "storage", "endpointurl", s3_endpoint], a, env)
    git_commit(a, "baseline with its remote")
    board = run_sweep(a, env, tmp_path / "a")
    run(["dvc", "push"], a, env)
    subprocess.run(GIT + ["remote", "add", "origin", str(origin)], cwd=a, check=True)
    subprocess.run(GIT + ["push", "-q", "origin", "HEAD:refs/heads/main"], cwd=a, check=True)
    run(["dvc", "exp", "push", "origin", "--rev", "HEAD"], a, env)
    bucket = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    assert bucket.list_objects_v2(Bucket="team", Prefix="transferlab/files/md5/")["KeyCount"] > 0

    # Machine B: a fresh clone; pull restores data, split and models; nothing needs to run.
    b = tmp_path / "b"
    subprocess.run(["git", "clone", "-q", "-b", "main", str(origin), str(b)], check=True)
    run(["dvc", "pull"], b, env)
    tracked = ["data/raw", "data/split", "models"]
    assert digests(b, tracked) == digests(a, tracked)
    assert sorted(p.name for p in (b / "models").glob("*.pt")) == ["extract.pt", "finetune.pt", "scratch.pt"]
    assert "Data and pipelines are up to date" in run(["dvc", "status"], b, env).stdout
    assert "Running stage" not in run(["dvc", "repro"], b, env).stdout

    # B sees A's experiments and ranks them as A did, without running anything.
    run(["dvc", "exp", "pull", "origin", "--rev", "HEAD"], b, env)
    names = run(["dvc", "exp", "list", "--name-only"], b, env).stdout.split()
    shown = run(["dvc", "exp", "show", "--csv"], b, env).stdout
    assert len(names) == 2 and all(name in shown for name in names)
    run(["transferlab", "compare", "--out", str(tmp_path / "board-b")], b, env)
    without_names = [{k: v for k, v in row.items() if k != "runs"} for row in board]  # A's branch is B's main
    assert [{k: v for k, v in row.items() if k != "runs"} for row in
            json.loads((tmp_path / "board-b" / "leaderboard.json").read_text())] == without_names

    # Back on A, docs/reliability.md's way to run a task again that the queue's race failed: `dvc exp run
    # --temp`, in a copy under .dvc/tmp/exps/ that reads the project's caches (here a change that
    # re-runs evaluate alone; what a seed re-runs, the queued experiments have just shown).
    before = digests(a, ["metrics", "plots"])
    [store] = [p for p in (a / "data/cache").glob("decoded-*") if p.is_dir()]
    os.utime(store, (0, 0))  # a store is marked used (its modification time) whenever a stage opens it
    out = run(["dvc", "exp", "run", "--temp", "-S", "evaluate.batch_size=4"], a, env).stdout
    assert "Running stage 'evaluate'" in out and "Stage 'train-finetune' didn't change, skipping" in out
    assert digests(a, ["metrics", "plots"]) == before  # it ran in the copy, not in A's workspace
    assert store.stat().st_mtime > 0  # the copy's evaluate read A's decoded images
    assert len(run(["dvc", "exp", "list", "--name-only"], a, env).stdout.split()) == 3
