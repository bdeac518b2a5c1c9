"""The README's commands, each run as the README writes it (`bash -c`, the venv's tools first on
PATH) on a tiny project: one made by `make repro`, with a branch `other-branch` beside `main`, and
one that fetches from a mirror. tests/test_readme.py says which test runs which command, and why
the others are not run."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, copy_finished, git_commit, make_image, run, stop_workers, tiny_project, write_test_weights

pytestmark = pytest.mark.integration  # through the real tools (make test-integration)

MODES = ("finetune", "extract", "scratch")
# Any download fails: what the README says runs offline must not reach the network.
OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "no_proxy": ""}


def sh(command: str, cwd: Path, env: dict[str, str]) -> str:
    """Run a README command verbatim through bash; what it printed (stdout, then stderr)."""
    result = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{command} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def set_params(path: Path, update) -> None:
    params = yaml.safe_load(path.read_text())
    update(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def restore(project: Path, env: dict[str, str]) -> None:
    """Back to the committed run, as a user's `git checkout -- .` and `dvc checkout` would be."""
    subprocess.run(["git", "checkout", "--", "."], cwd=project, check=True)
    run(["dvc", "checkout", "-q"], project, env)


@pytest.fixture(scope="module")
def made(finished_project, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], str]:
    """The session's finished project (squeezenet, 2 epochs) on `main`, and `other-branch` beside
    it, where `make repro` re-ran what scratch trained for 1 epoch changes; what make printed."""
    project, env = copy_finished(finished_project, tmp_path_factory.mktemp("readme") / "project")
    subprocess.run(["git", "branch", "-m", "main"], cwd=project, check=True)
    shutil.copy2(ROOT / "Makefile", project / "Makefile")
    # This venv, installed: `make repro` skips its install step, as on a second run, and runs dvc repro.
    (project / ".venv").symlink_to(ROOT / ".venv")
    installed = (ROOT / ".venv/.installed").stat().st_mtime
    os.utime(project / "pyproject.toml", (installed - 1, installed - 1))
    with open(project / ".git/info/exclude", "a") as f:
        f.write("/.venv\n/Makefile\n")  # .gitignore's /.venv/ is a folder's pattern, not a link's
    subprocess.run(["git", "checkout", "-qb", "other-branch"], cwd=project, check=True)
    set_params(project / "params.yaml", lambda p: p["scratch"].update(epochs=1))
    out = sh("make repro", project, env)
    git_commit(project, "scratch for 1 epoch")
    subprocess.run(["git", "checkout", "-q", "main"], cwd=project, check=True)
    run(["dvc", "checkout", "-q"], project, env)
    return project, env, out


def test_make_repro_runs_the_pipeline_and_dvc_reads_it_back(made):
    project, env, out = made
    ran = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]
    assert ran == ["train-scratch", "evaluate", "plot"]  # what one changed key re-runs
    assert set(json.loads((project / "metrics/eval.json").read_text())) == set(MODES)
    assert "Data and pipelines are up to date" in sh("dvc repro", project, env)
    assert "scratch.accuracy" in sh("dvc metrics show", project, env)
    assert sh("dvc metrics diff", project, env).strip() == ""  # the workspace is the last commit
    diff = sh("dvc metrics diff main other-branch", project, env)
    assert "metrics/train/scratch.json" in diff and "train_seconds" in diff
    assert "metrics/train/finetune.json" not in diff  # only scratch changed
    for command in ("dvc plots show", "dvc plots diff main other-branch"):
        shutil.rmtree(project / "dvc_plots", ignore_errors=True)
        printed = sh(command, project, env)
        page = (project / "dvc_plots/index.html").read_text()
        assert "dvc_plots/index.html" in printed and "vegaEmbed('#" in page and "<script src=" not in page
    compared = sh("transferlab compare main other-branch", project, env)
    assert "scratch: " in compared and "->" in compared
    assert json.loads((project / "leaderboard.json").read_text())


@pytest.mark.parametrize("command", ["source .venv/bin/activate", 'export PATH="$PWD/.venv/bin:$PATH"'])
def test_activate_or_export_puts_the_venv_first(made, command):
    project, env, _ = made
    bare = {**env, "PATH": "/usr/bin:/bin"}  # a shell that finds no dvc of ours
    found = sh(f"{command}\ncommand -v dvc transferlab", project, bare).split()
    assert [Path(p).resolve() for p in found] == [(ROOT / ".venv/bin" / name).resolve() for name in
                                                  ("dvc", "transferlab")]


def test_experiments_rerun_what_depends_on_their_keys(made, tmp_path):
    project, env = copy_finished(made[:2], tmp_path / "project")
    env["TORCH_HOME"] = str(tmp_path / "torch_home")
    for arch in ("squeezenet1_0", "resnet18"):
        write_test_weights(tmp_path / "torch_home", arch)  # random weights under torchvision's file name
    # Scratch stops after an epoch without a better val accuracy, as `patience` says: 40 epochs of
    # it would take half a minute here, and change nothing this test asserts (scratch, stale now,
    # re-runs in each experiment below).
    set_params(project / "params.yaml", lambda p: p["scratch"].update(patience=1))
    git_commit(project, "scratch with patience")
    out = sh("dvc exp run -S model=resnet", project, env)
    assert "Stage 'fetch' didn't change, skipping" in out and "Stage 'split' didn't change, skipping" in out
    assert all(f"Running stage '{stage}'" in out for stage in ("decode", "train-finetune", "evaluate", "plot"))
    restore(project, env)

    for command in ("dvc exp run -S scratch.lr=0.01 -S scratch.epochs=60", "dvc exp run -S ++scratch.gamma=0.5"):
        out = sh(command, project, env)
        assert "Running stage 'train-scratch'" in out and "Stage 'decode' didn't change, skipping" in out
        assert "Stage 'train-finetune' didn't change" in out and "Stage 'train-extract' didn't change" in out
        scratch = yaml.safe_load((project / "params.yaml").read_text())["scratch"]
        assert scratch["gamma" if "gamma" in command else "epochs"] == (0.5 if "gamma" in command else 60)
        restore(project, env)
    out = sh("dvc exp run -n fine-tune -S finetune.head_epochs=1 -S finetune.backbone_lr_factor=0.1 "
             "-S finetune.scheduler=onecycle", project, env)
    assert "Running stage 'train-finetune'" in out and "Stage 'train-extract' didn't change" in out
    compared = sh("transferlab compare HEAD fine-tune", project, env)
    assert "finetune: " in compared and "fine-tune" in compared
    restore(project, env)

    shown = sh("dvc exp show --only-changed", project, {**env, "COLUMNS": "400"})
    assert "fine-tune" in shown and "model" in shown and "scratch.gamma" in shown
    assert "split.val_fraction" not in shown  # the same in every experiment


def test_the_classifier_lines_predict_and_export(made, tmp_path):
    project, env = copy_finished(made[:2], tmp_path / "project")
    make_image(project / "bee.jpg", (40, 80, 200), seed=1)
    for i in range(2):
        make_image(project / f"photos/{i}.jpg", (200, 60, 40), seed=10 + i)
        make_image(project / f"more/{i}.jpg", (40, 80, 200), seed=20 + i)
    lines = ['from transferlab import Classifier',
             'classifier = Classifier.load("models/finetune.pt")',
             'for p in classifier.predict(["bee.jpg", "photos/"]): print(p.path, p.label, p.confidence)']
    printed = run([sys.executable, "-c", "\n".join(lines)], project, env).stdout.splitlines()
    assert [line.split()[0] for line in printed] == ["bee.jpg", "photos/0.jpg", "photos/1.jpg"]
    assert all(line.split()[1] in ("ants", "bees") and 0 <= float(line.split()[2]) <= 1 for line in printed)

    sh("transferlab predict models/finetune.pt photos/ 'more/*.jpg' --top-k 3 --csv predictions.csv "
       "--grid predictions.png", project, env)
    assert (project / "predictions.csv").read_text().count("\n") == 5  # a header, four images
    assert (project / "predictions.png").read_bytes()[:4] == b"\x89PNG"
    sh("transferlab export models/finetune.pt --out finetune.onnx", project, env)
    assert (project / "finetune.onnx").stat().st_size > 0


def test_a_learning_curve_runs_and_is_drawn(made, tmp_path):
    project, env = copy_finished(made[:2], tmp_path / "project")
    set_params(project / "curves/params.yaml",
               lambda p: p["curve"].update(images_per_class=[2, "all"], modes=["extract"], seeds=[0]))
    out = sh("transferlab curve", project, env)
    assert "point@2-extract-0" in out and "point@all-extract-0" in out and "summary" in out
    assert "| all" in (project / "curves/curve.md").read_text()
    sh("dvc plots show learning_curve", project, env)
    assert "vegaEmbed('#learning_curve'" in (project / "dvc_plots/index.html").read_text()


def test_sharing_through_s3_and_git(made, tmp_path):
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is a test dependency")
    boto3 = pytest.importorskip("boto3")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        # S3 itself, as boto's own variable points every client at it (the user's needs none).
        s3 = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
              "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
        bucket = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        bucket.create_bucket(Bucket="my-bucket")
        project, env = copy_finished(made[:2], tmp_path / "a")
        env.update(s3)
        env.update({f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")  # the user's git identity
                    for what, value in (("NAME", "user"), ("EMAIL", "user@example.com"))})
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", tmp_path / "origin.git"], check=True)
        subprocess.run(["git", "remote", "add", "origin", tmp_path / "origin.git"], cwd=project, check=True)
        subprocess.run(["git", "config", "push.autoSetupRemote", "true"], cwd=project, check=True)

        sh("dvc remote add -d storage s3://my-bucket/transferlab", project, env)
        sh('git commit -m "the DVC remote" .dvc/config', project, env)
        assert "pushed" in sh("dvc push", project, env)
        assert bucket.list_objects_v2(Bucket="my-bucket", Prefix="transferlab/")["KeyCount"] > 0
        sh("git push", project, env)
        set_params(project / "params.yaml", lambda p: p["scratch"].update(lr=0.01))
        run(["dvc", "exp", "save", "-n", "shared"], project, env)  # an experiment to share, without a run
        assert "shared" in sh("dvc exp push origin --rev HEAD", project, env)

        other = tmp_path / "b"
        subprocess.run(["git", "clone", "-q", tmp_path / "origin.git", other], check=True)
        sh("dvc pull", other, env)
        assert (other / "models/finetune.pt").exists()
        assert "Data and pipelines are up to date" in sh("dvc repro", other, env)
        sh("dvc exp pull origin --rev HEAD", other, env)
        assert "shared" in run(["dvc", "exp", "list"], other, env).stdout
    finally:
        server.stop()


def test_offline_from_a_mirror_then_a_queued_sweep_is_ranked(tmp_path):
    project, env = tiny_project(tmp_path, epochs=1, batch_size=8)  # two pipelines: each as short as it gets
    env.update(OFFLINE)
    data = tmp_path / "tiny"  # the tutorial's layout, zipped under the official name at ../shared/data
    (tmp_path / "shared/data").mkdir(parents=True)
    with zipfile.ZipFile(tmp_path / "shared/data/hymenoptera_data.zip", "w") as archive:
        for image in sorted(data.rglob("*.jpg")):
            archive.write(image, f"hymenoptera_data/{image.relative_to(data)}")
    official = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]["url"]
    set_params(project / "params.yaml", lambda p: p["data"].update(url=official))

    out = sh("TRANSFERLAB_DATA_MIRROR=../shared/data dvc exp run -S model=efficientnet_lite0", project, env)
    assert "Running stage 'fetch'" in out and "Running stage 'train-scratch'" in out
    assert json.loads((project / "data/split/report.json").read_text())["counts"]["test"] == {"ants": 4, "bees": 4}
    git_commit(project, "lite0 from the mirror")

    sh("dvc exp run --queue -S model=efficientnet_lite0,efficientnet_lite1,efficientnet_lite2 -S seed=1,2,3",
       project, env)
    queued = json.loads(run(["dvc", "exp", "show", "--json"], project, env).stdout)
    tasks = {(e["revs"][0]["data"]["params"]["params.yaml"]["data"]["model"],
              e["revs"][0]["data"]["params"]["params.yaml"]["data"]["seed"]): e["revs"][0]["name"]
             for e in queued[1]["experiments"]}
    assert set(tasks) == {(f"efficientnet_lite{m}", s) for m in range(3) for s in (1, 2, 3)}
    assert sh("dvc queue status", project, env).count("Queued") == 9
    # Nine tiny pipelines would take minutes: one of them runs, the others are taken off the queue.
    run(["dvc", "queue", "remove", *[name for key, name in tasks.items() if key != ("efficientnet_lite0", 1)]],
        project, env)
    with tempfile.TemporaryFile("w+") as log:  # its workers inherit its stdout: not a pipe to read to its end
        started = subprocess.run(["bash", "-c", "dvc queue start -j 1"], cwd=project, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
        log.seek(0)
        assert started.returncode == 0, log.read()
    deadline = time.time() + 600
    while "Queued" in (status := sh("dvc queue status", project, env)) or "Running" in status:
        assert time.time() < deadline, status
        time.sleep(1)
    run(["dvc", "queue", "stop"], project, env)
    stop_workers(project)
    assert "Success" in status and "Failed" not in status, status

    out = sh("transferlab compare", project, env)
    rows = json.loads((project / "leaderboard.json").read_text())
    assert {(r["model"], r["mode"]): r["seeds"] for r in rows} == {("efficientnet_lite0", m): 2 for m in MODES}
    assert (project / "leaderboard.md").exists() and (project / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"
    assert "**best**" in out
