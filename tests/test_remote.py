"""Sharing work between machines with DVC's own engines: an S3-compatible remote (moto's server on
loopback, a real S3 wire protocol) for data and models, a git remote (a bare repository on disk)
for code, metrics and experiments. Machine A runs; machine B pulls, runs nothing, and compares."""
import hashlib
import subprocess
from pathlib import Path

import pytest
from conftest import git_commit, run, tiny_project, wait_for_queue

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


def test_push_on_one_machine_pull_on_another_runs_nothing_and_compares(tmp_path, s3_endpoint):
    # Machine A: the pipeline, a remote for data and models, two experiments, all pushed.
    a, env = tiny_project(tmp_path / "machine-a", epochs=1, batch_size=4)
    env.update(CREDENTIALS)
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    run(["dvc", "remote", "add", "-d", "storage", "s3://team/transferlab"], a, env)
    run(["dvc", "remote", "modify", "storage", "endpointurl", s3_endpoint], a, env)
    run(["dvc", "repro"], a, env)
    git_commit(a, "baseline with its remote")
    run(["dvc", "exp", "run", "--queue", "-S", "seed=1,2"], a, env)
    run(["dvc", "queue", "start", "-j", "2"], a, env)
    assert wait_for_queue(a, env).count("Success") == 2
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

    # B sees A's experiments and ranks them without running anything.
    run(["dvc", "exp", "pull", "origin", "--rev", "HEAD"], b, env)
    names = run(["dvc", "exp", "list", "--name-only"], b, env).stdout.split()
    shown = run(["dvc", "exp", "show", "--csv"], b, env).stdout
    assert len(names) == 2 and all(name in shown for name in names)
    out = run(["transferlab", "compare", "--out", str(tmp_path / "board")], b, env).stdout
    assert "**best**" in out and "| 3 |" in out  # the baseline's seed and the two experiments' seeds pooled
