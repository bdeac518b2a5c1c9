"""What a user meets through `dvc repro` and `dvc exp run` when something goes wrong: every stage
that fails or is interrupted leaves the previous outputs exactly as they were, and says so."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import copy_finished, copy_project, interrupt, pipeline_env, run

pytestmark = pytest.mark.integration  # through the real tools (make test-integration)

MODES = ("finetune", "extract", "scratch")
OUTPUTS = ["data/raw", "data/fetch.json", "data/split", *(f"models/{m}.pt" for m in MODES),
           *(f"logs/{m}" for m in MODES), *(f"metrics/train/{m}.json" for m in MODES),
           *(f"reports/train/{m}.json" for m in MODES), "metrics/eval.json", "reports/eval.json",
           "metrics/predictions", "plots"]


def git(project: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args]
    return subprocess.run(command, cwd=project, check=True, capture_output=True, text=True).stdout


def snapshot(project: Path) -> dict[str, bytes]:
    """Every file of every pipeline output, by path."""
    files = {}
    for output in OUTPUTS:
        path = project / output
        for file in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
            files[file.relative_to(project).as_posix()] = file.read_bytes()
    return files


@pytest.fixture(scope="module")
def finished(finished_project, tmp_path_factory):
    """A project whose whole pipeline ran once (2 epochs, tiny data), committed: the user's last
    good run (a copy of the session's, which these tests change)."""
    project, env = copy_finished(finished_project, tmp_path_factory.mktemp("faults") / "project")
    return project, env, snapshot(project)


def assert_nothing_lost(project: Path, good: dict[str, bytes]) -> None:
    assert snapshot(project) == good
    changed = [line for line in git(project, "status", "--porcelain").splitlines() if "params.yaml" not in line]
    assert changed == []


def restore_params(project: Path) -> None:
    git(project, "checkout", "--", "params.yaml")


def assert_refused(finished, setting: str, *messages: str) -> None:
    """`dvc exp run -S setting` fails, says each of `messages`, and loses nothing of the last run."""
    project, env, good = finished
    result = run(["dvc", "exp", "run", "-S", setting], project, env, check=False)
    restore_params(project)
    assert result.returncode != 0
    said = result.stderr + result.stdout
    assert [m for m in messages if m not in said] == [], said
    assert_nothing_lost(project, good)


def test_bad_params_through_dvc_exp_run_keep_every_output(finished):
    assert_refused(finished, "train.lr=fast", "params.yaml: train.lr: expected a number, got 'fast'",
                   "unchanged, as the last finished run left them: models/")


def test_missing_data_url_keeps_data_raw(finished):
    assert_refused(finished, f"data.url={finished[0] / 'no-such.zip'}", "no-such.zip: no such file",
                   "Nothing was changed", "unchanged, as the last finished run left them: data/raw/, data/fetch.json")


def test_ctrl_c_mid_epoch_under_dvc_repro_keeps_every_output(finished):
    project, env, good = finished
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["finetune"]["epochs"] = 40  # only train-finetune re-runs
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # A terminal's Ctrl-C signals the whole foreground process group: dvc and the stage it runs.
    process = subprocess.Popen(["dvc", "repro"], cwd=project, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith("epoch 2/40"):
            os.killpg(process.pid, signal.SIGINT)
            break
    out, _ = process.communicate(timeout=120)
    restore_params(project)
    message = "".join(seen) + out
    assert process.returncode != 0 and "interrupted by SIGINT" in message, message
    assert "unchanged, as the last finished run left them: models/" in message
    assert_nothing_lost(project, good)


def test_documented_per_mode_overrides_work_as_written(finished):
    project, env, _ = finished
    out = run(["dvc", "exp", "run", "-S", "scratch.lr=0.01", "-S", "scratch.epochs=1",
               "-S", "++scratch.gamma=0.5"], project, env).stdout
    restore_params(project)
    assert "Running stage 'train-scratch'" in out
    assert "Stage 'train-finetune' didn't change, skipping" in out
    assert "Stage 'train-extract' didn't change, skipping" in out
    git(project, "checkout", "--", ".")
    run(["dvc", "checkout", "-q"], project, env)


def test_lr_find_and_patience_through_dvc_exp_run(finished_project, tmp_path):
    """`-S scratch.lr=find`: the range test picks scratch's lr, the report and a figure show the
    sweep, and a run that changes only the cap reads the sweep back; patience stops early."""
    project, env = copy_finished(finished_project, tmp_path / "project")  # its own: it leaves a figure
    env["TRANSFERLAB_CACHE_DIR"] = str(tmp_path / "cache")  # and a sweep no other test should read
    out = run(["dvc", "exp", "run", "-S", "scratch.lr=find", "-S", "scratch.epochs=1"], project, env).stdout
    assert "lr range test: lr " in out and "Stage 'train-finetune' didn't change, skipping" in out
    report = json.loads((project / "reports/train/scratch.json").read_text())
    found = report["lr_find"]
    assert found["suggestion"] > 0 and not found["cached"] and len(found["lrs"]) == len(found["smoothed"])
    assert (project / "logs/scratch/lr_find.png").read_bytes()[:4] == b"\x89PNG"
    again = run(["dvc", "exp", "run", "-S", "scratch.lr=find", "-S", "scratch.epochs=3", "-S", "scratch.patience=1"],
                project, env).stdout
    report = json.loads((project / "reports/train/scratch.json").read_text())
    assert report["lr_find"]["cached"] and report["lr_find"]["suggestion"] == found["suggestion"]
    assert "; cached)" in again and report["epochs"] <= 3
    assert report["stopped_early"] == (report["epochs"] < 3)


@pytest.mark.parametrize("stage, args, missing, maker", [
    ("split", [], "data/raw", "fetch"),
    ("train", ["finetune"], "data/split/train.csv", "split"),
    ("evaluate", [], "models/finetune.pt", "train-finetune"),
    ("plot", [], "reports/eval.json", "evaluate"),
])
def test_a_stage_run_before_its_inputs_exist_names_them(tmp_path, stage, args, missing, maker):
    project = copy_project(tmp_path / "project")
    result = run([sys.executable, "-m", f"transferlab.stages.{stage}", *args], project, pipeline_env(), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{missing} is missing (the {maker} stage makes it)" in result.stderr
    assert maker in result.stderr.split("Run `dvc repro ")[1].split("`")[0]
    assert "nothing was written" in result.stderr


def test_an_empty_data_folder_stops_at_fetch(tmp_path):
    project = copy_project(tmp_path / "project")
    (tmp_path / "empty").mkdir()
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["url"] = str(tmp_path / "empty")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run(["dvc", "repro", "fetch"], project, pipeline_env(), check=False)
    assert result.returncode != 0
    assert "is empty: there are no class folders of images" in result.stderr + result.stdout
    assert "data.url in params.yaml is" in result.stderr + result.stdout
    assert not (project / "data/raw").exists()


def cache_files(cache: Path, pattern: str) -> list[Path]:
    return sorted(p for p in cache.glob(pattern) if p.is_file())


def test_damaged_caches_heal_themselves_under_dvc_repro(finished):
    project, env, good = finished
    cache = Path(env["TRANSFERLAB_CACHE_DIR"])
    store = json.loads((project / "data/decode.json").read_text())["store"]
    pixels = cache / store / "pixels.bin"
    pixels.write_bytes(pixels.read_bytes()[:pixels.stat().st_size // 3])
    for embeddings in cache_files(cache, "features-*/train.bin"):
        embeddings.write_bytes(embeddings.read_bytes()[:100])
    repro = ["dvc", "repro", "--force", "--single-item", "train-extract"]
    result = run(repro, project, env)
    message = result.stdout + result.stderr
    assert "pixels.bin" in message and "decoding the missing images again" in message
    assert "damaged embedding cache" in message and "running the backbone again" in message
    # A damaged hardware decision is measured again (apart: a new decision may change the input
    # path, and with it which embedding cache is read). The tests pin every setting, so one is
    # left to `auto` here: the stage measures it and caches the decision, which is then damaged.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["tensor_batches"] = "auto"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(repro, project, env)
    for decision in cache_files(cache, "hardware/decision-*.json"):
        decision.write_text(decision.read_text()[:20])
    result = run(repro, project, env)
    message = result.stdout + result.stderr
    assert "unreadable" in message and "measuring the candidates again" in message
    assert json.loads((project / "metrics/train/extract.json").read_text())["best_val_accuracy"] >= 0
    git(project, "checkout", "--", ".")
    run(["dvc", "checkout", "-q"], project, env)


def trained_scratch(project: Path) -> tuple[dict, dict]:
    report = json.loads((project / "reports/train/scratch.json").read_text())
    return report, torch.load(project / "models/scratch.pt", weights_only=True)["state_dict"]


def test_sigterm_keeps_the_outputs_and_a_resumed_run_ends_as_one_started_afresh(finished):
    """SIGTERM mid-training keeps the last good outputs and a resume state; the next run continues
    after the last finished epoch. Interrupted again, its state damaged (as a crash or a full disk
    might leave it), the next run starts again at epoch 1: it ends exactly where the resumed run did."""
    project, env, good = finished
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["scratch"]["epochs"] = 3  # the signal comes in epoch 2 (a second of work here, against milliseconds)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    train = [sys.executable, "-m", "transferlab.stages.train", "scratch"]
    returncode, stderr = interrupt(train, project, env, "epoch 1/3")
    assert returncode == 143 and "interrupted by SIGTERM" in stderr
    assert "unchanged, as the last finished run left them: models/scratch.pt, logs/scratch/" in stderr
    assert snapshot(project) == good
    assert len(cache_files(project / "data/cache/resume", "resume-scratch-*.pt")) == 1
    assert "resuming after epoch" in run(train, project, env).stdout
    assert not cache_files(project / "data/cache/resume", "resume-scratch-*"), "a finished run leaves none"
    resumed, resumed_weights = trained_scratch(project)
    assert (project / "logs/scratch/plots/metrics/val/acc.tsv").read_text().count("\n") == 4  # header + 3 epochs

    returncode, _ = interrupt(train, project, env, "epoch 1/3")
    assert returncode == 143
    [state] = cache_files(project / "data/cache/resume", "resume-scratch-*.pt")
    state.write_bytes(state.read_bytes()[:500])
    result = run(["dvc", "repro", "train-scratch"], project, env)
    assert f"{state.relative_to(project)}: unreadable resume state" in result.stderr
    assert "training starts again at epoch 1" in result.stderr and "epoch 3/3" in result.stdout
    afresh, afresh_weights = trained_scratch(project)
    for key in ("best_epoch", "best_val_accuracy", "best_val_loss", "epochs"):
        assert resumed[key] == afresh[key], key
    assert all(torch.equal(resumed_weights[k], afresh_weights[k]) for k in resumed_weights)
    restore_params(project)
    git(project, "checkout", "--", ".")
    run(["dvc", "checkout", "-q"], project, env)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs: a real full disk. Needs the right to mount (root, or a user namespace)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.strip() or 'mount failed'})")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_says_so_and_keeps_the_outputs(finished, small_disk):
    project, env, good = finished
    env = {**env, "TRANSFERLAB_CACHE_DIR": str(small_disk)}  # the cache on a disk with 1 MB
    result = run(["dvc", "repro", "--force", "train-extract"], project, env, check=False)
    message = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in message
    assert f"no space left on {small_disk}" in message and "TRANSFERLAB_CACHE_DIR" in message
    assert "unchanged, as the last finished run left them: models/extract.pt" in message
    assert_nothing_lost(project, good)
    assert not [p for p in small_disk.rglob(".*.tmp")]  # nothing half-written stays behind


def test_training_recipes_through_dvc_exp_run_and_compare_ranks_them(finished, tmp_path):
    """fastai's fine_tune (head first, then unfrozen), partial freezing, discriminative lrs, Adam
    and one-cycle for finetune, an MLP head for finetune and extract (which trains it on cached
    embeddings), as a user sets them per mode (scratch does not run again); evaluate reads the MLP
    heads from the checkpoints."""
    project, env, _ = finished
    result = run(["dvc", "exp", "run", "-n", "recipes", "-S", "++finetune.head=mlp",
                  "-S", "++finetune.head_hidden=[32]", "-S", "finetune.optimizer=adam",
                  "-S", "finetune.scheduler=onecycle", "-S", "finetune.head_epochs=1",
                  "-S", "finetune.freeze=0.5", "-S", "finetune.backbone_lr_factor=0.1",
                  "-S", "++extract.head=mlp", "-S", "++extract.head_hidden=[32]"], project, env)
    assert "the head alone first, on the frozen backbone: 1 epochs" in result.stdout
    assert "Stage 'train-scratch' didn't change, skipping" in result.stdout
    report = json.loads((project / "reports/train/finetune.json").read_text())
    assert report["epochs"] == 3 and 0 < report["trainable_parameters"] < report["parameters"]
    for mode in ("finetune", "extract"):
        checkpoint = torch.load(project / f"models/{mode}.pt", weights_only=True)
        assert checkpoint["head"] == {"hidden": [32], "dropout": 0.5}, mode
    out = run(["transferlab", "compare", "HEAD", "recipes", "--out", str(tmp_path)], project, env).stdout
    rows = json.loads((tmp_path / "leaderboard.json").read_text())
    # HEAD's finetune has no head key of its own (it is train's, linear): a row each.
    assert {(r["mode"], r["params"].get("finetune.head")) for r in rows} >= {("finetune", None), ("finetune", "mlp")}
    assert "recipes against HEAD" in out
    restore_params(project)
    git(project, "checkout", "--", ".")
    run(["dvc", "checkout", "-q"], project, env)


def test_mixing_cached_embeddings_is_refused_through_dvc_exp_run_and_keeps_every_output(finished):
    """train.mixup_alpha reaches extract, whose head trains on cached embeddings: refused before any
    work, naming the mode's key and the fix."""
    assert_refused(finished, "train.mixup_alpha=0.2",
                   "params.yaml: extract.mixup_alpha: is 0.2, but mixup and cutmix mix images",
                   "set extract.cache_features: false", "unchanged, as the last finished run left them: models/")


def test_regularisation_recipes_through_dvc_exp_run(finished):
    """Every recipe at once, as a user sets them: augmentation for every mode (extract's cached
    views too), label smoothing and the weights' average; mixup for finetune, cutmix for scratch."""
    project, env, _ = finished
    result = run(["dvc", "exp", "run", "-n", "regularised", "-S", "train.augment=trivialaugment",
                  "-S", "train.label_smoothing=0.1", "-S", "train.ema_decay=0.5", "-S", "++finetune.mixup_alpha=0.2",
                  "-S", "++scratch.cutmix_alpha=1.0"], project, env)
    assert "Stage 'train-extract' didn't change" not in result.stdout
    for mode in MODES:
        checkpoint = torch.load(project / f"models/{mode}.pt", weights_only=True)
        assert checkpoint["params"]["train"]["augment"] == "trivialaugment", mode
    assert torch.load(project / "models/finetune.pt", weights_only=True)["params"]["train"]["mixup_alpha"] == 0.2
    assert json.loads((project / "reports/train/extract.json").read_text())["features_cached"]
    restore_params(project)
    git(project, "checkout", "--", ".")
    run(["dvc", "checkout", "-q"], project, env)
