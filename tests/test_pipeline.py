"""The real pipeline, end to end: dvc repro, dvc exp run -S model=..., dvc metrics diff."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    PINNED_HARDWARE,
    copy_finished,
    copy_project,
    modes_follow_train,
    pipeline_env,
    run,
    write_test_weights,
)

pytestmark = pytest.mark.integration  # through the real tools (make test-integration)

MODES = ("finetune", "extract", "scratch")


def set_params(project, **sections):
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def commit(project, message):
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(git + ["add", "-A"], cwd=project, check=True)
    subprocess.run(git + ["commit", "-qm", message], cwd=project, check=True)


def reflinks(folder: Path) -> bool:
    """Whether this filesystem can clone files (then DVC links by reflink, not hard link)."""
    (folder / ".probe").write_text("x")
    cloned = subprocess.run(["cp", "--reflink=always", folder / ".probe", folder / ".probe2"], capture_output=True)
    for name in (".probe", ".probe2"):
        (folder / name).unlink(missing_ok=True)
    return cloned.returncode == 0


def test_repro_then_experiment_then_metrics_diff(finished_project, tmp_path):
    """The session's `dvc repro` (squeezenet, 2 epochs, fp32), read as it left the project; then,
    in a copy, the cache links, `dvc checkout`, `dvc exp run -S model=resnet` with `auto`
    hardware, `dvc metrics diff` and the plots."""
    project, env = finished_project
    out = (project.parent / "repro.log").read_text()
    ran = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]
    assert ran[:3] == ["fetch", "split", "decode"] and ran[-2:] == ["evaluate", "plot"]
    assert sorted(ran[3:6]) == ["train-extract", "train-finetune", "train-scratch"]
    decoded = json.loads((project / "data/decode.json").read_text())
    assert decoded["images"] == 24 and decoded["min_side"] == 256  # 16 train + val, 8 test
    assert (Path(env["TRANSFERLAB_CACHE_DIR"]) / decoded["store"] / "pixels.bin").stat().st_size == decoded["bytes"]

    report = json.loads((project / "data/split/report.json").read_text())
    assert report["counts"]["test"] == {"ants": 4, "bees": 4}
    assert report["near_duplicates"] == {"threshold": 8, "pairs": []}  # checked, none among distinct images
    assert "near-copies (perceptual-hash distance <= 8): 0 images left out of train and val" in out
    for mode in MODES:
        checkpoint = torch.load(project / f"models/{mode}.pt", weights_only=True)
        assert (checkpoint["arch"], checkpoint["classes"], checkpoint["mode"]) == \
            ("squeezenet1_0", ["ants", "bees"], mode)
        assert checkpoint["preprocess"]["crop_size"] == 224 and checkpoint["state_dict"]
        summary = json.loads((project / f"reports/train/{mode}.json").read_text())
        assert summary["epochs"] == 2 and summary["train_images_per_s"] > 0
        assert summary["first_epoch_images_per_s"] > 0 and summary["steady_images_per_s"] > 0
        assert json.loads((project / f"metrics/train/{mode}.json").read_text()) == {
            "train_seconds": round(summary["wall_seconds"], 1), "best_val_accuracy": summary["best_val_accuracy"],
            "world_size": 1}
        with open(project / f"metrics/predictions/{mode}.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 8 and {r["actual"] for r in rows} == {"ants", "bees"}
        assert (project / f"logs/{mode}/plots/metrics/val/acc.tsv").read_text().count("\n") == 3
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    details = json.loads((project / "reports/eval.json").read_text())
    for mode in MODES:
        m = evaluation[mode]
        assert 0 <= m["accuracy_ci95_low"] <= m["accuracy"] <= m["accuracy_ci95_high"] <= 1
        assert set(m) == {"accuracy", "accuracy_ci95_low", "accuracy_ci95_high", "balanced_accuracy", "roc_auc"}
        assert details[mode]["images"] == 8 and details[mode]["inference_images_per_s"] > 0
    assert "mcnemar_p" in details["finetune_vs_scratch"] and details["classes"] == ["ants", "bees"]
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], project, env).stdout)
    numbers = [v for files in shown.values() for f in files["data"].values() for m in f["data"].values()
               for v in (m.values() if isinstance(m, dict) else [m])]
    assert len(numbers) == 3 * 5 + 3 * 3  # what `dvc exp show` puts in columns: a screenful
    for png in ("val_accuracy", "loss", "test_accuracy", "confusion", "test_predictions", "top_losses"):
        assert (project / f"plots/{png}.png").read_bytes()[:4] == b"\x89PNG"
    for mode in MODES:  # the mistakes with the largest loss, largest first
        mistakes = details[mode]["top_losses"]
        assert len(mistakes) == min(16, details[mode]["images"] - details[mode]["correct"])
        assert all(m["true"] != m["predicted"] for m in mistakes)
        assert [m["loss"] for m in mistakes] == sorted((m["loss"] for m in mistakes), reverse=True)
    # As typed: a plain `dvc status` reads every dvc.yaml of the project, and finds no curve nobody
    # asked for (transferlab curve writes its pipeline only when asked).
    assert run(["dvc", "status"], project, env).stdout.strip() == "Data and pipelines are up to date."

    project, env = copy_finished(finished_project, tmp_path / "project")
    # The cache links (.dvc/config: reflink, else hardlink). DVC leaves a stage's new persistent
    # outputs as copies (a stage may rewrite them), as does a copy of the project; --relink turns
    # them into links to its cache.
    run(["dvc", "checkout", "--relink"], project, env)
    image = next((project / "data/raw").rglob("*.jpg"))
    if not reflinks(project):
        assert image.stat().st_nlink == 2, "data/raw is a copy of DVC's cache, not a link to it"
    shutil.rmtree(project / "data/raw")
    (project / "models/finetune.pt").unlink()
    run(["dvc", "checkout"], project, env)
    assert image.exists() and (project / "models/finetune.pt").exists()
    assert "Data and pipelines are up to date" in run(["dvc", "status"], project, env).stdout

    # The user's default: precision and layout measured (`auto`), then the README's experiment.
    # For finetune alone: one measurement shows it as well as three (tests/test_hardware.py tests
    # the decision itself).
    set_params(project, finetune={"precision": "auto", "channels_last": "auto"})
    commit(project, "auto hardware")
    env["TORCH_HOME"] = str(tmp_path / "torch_home")
    write_test_weights(tmp_path / "torch_home", "resnet18")  # random weights under torchvision's own file name
    out = run(["dvc", "exp", "run", "-S", "model=resnet"], project, env).stdout
    assert "Stage 'fetch' didn't change, skipping" in out and "Stage 'split' didn't change, skipping" in out
    assert "Running stage 'train-finetune'" in out and "Running stage 'plot'" in out
    assert torch.load(project / "models/finetune.pt", weights_only=True)["arch"] == "resnet18"
    details = json.loads((project / "reports/eval.json").read_text())
    summary = json.loads((project / "reports/train/finetune.json").read_text())
    decision = summary["auto_decision"]  # precision and layout measured here, not assumed
    assert decision["chosen"] in decision["seconds_per_image"]["model"] and decision["margin"] >= 0.05
    assert summary["precision"] == decision["chosen"].split()[0]
    for mode in MODES:
        # Test metrics do not hang on a timing: fp32 in the plain layout, nothing measured.
        assert (details[mode]["precision"], details[mode]["channels_last"], details[mode]["auto_decision"]) == \
            ("fp32", False, None)

    diff = json.loads(run(["dvc", "metrics", "diff", "--all", "--json"], project, env).stdout)
    assert {f"{mode}.accuracy" for mode in MODES} <= set(diff["metrics/eval.json"])
    params = json.loads(run(["dvc", "params", "diff", "--json"], project, env).stdout)
    assert params["params.yaml"]["model"] == {"old": "squeezenet", "new": "resnet"}
    # Plain DVC commands draw offline: .dvc/config names the page the plot stage wrote.
    for command in (["dvc", "plots", "show"], ["dvc", "plots", "diff", "HEAD"]):
        out_dir = tmp_path / command[2]
        shown = run(command + ["-o", str(out_dir)], project, env)
        assert "failed to load" not in shown.stdout + shown.stderr  # no plots of a curve nobody ran
        page = (out_dir / "index.html").read_text()
        assert "<script src=" not in page and "cdn.jsdelivr" not in page  # nothing fetched from a CDN
        assert "window.vegaEmbed=" in page and page.count("vegaEmbed('#") >= 4  # Vega inlined, every plot drawn


def test_bad_params_stop_the_stage_before_any_work(tmp_path):
    project = copy_project(tmp_path / "project")
    set_params(project, train={"lr": "fast"})
    result = run(["dvc", "repro", "fetch"], project, pipeline_env(), check=False)
    assert result.returncode != 0
    assert "params.yaml: train.lr: expected a number, got 'fast'" in result.stderr + result.stdout
    assert not (project / "data").exists()


# Used by every stage and changing no result on its own (messages, file writing, cache bookkeeping);
# a stage need not list them as deps.
PLUMBING = {"__init__.py", "errors.py", "files.py", "params.py", "caches.py", "stages/__init__.py"}


def test_each_stage_depends_on_the_code_it_runs():
    """A change to any module a stage imports re-runs that stage under dvc repro."""
    root = Path(__file__).resolve().parents[1]
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    # A learning curve's point and its summary too: a change to the summary's code re-runs the
    # summary alone, not every point.
    curve = yaml.safe_load((root / "curves/pipeline.yaml").read_text())["stages"]
    stages["curve point"], stages["curve summary"] = curve["point"], curve["summary"]
    modules = {name: stage["cmd"].split()[2] for name, stage in stages.items()}  # python -m transferlab.stages.X
    # One fresh interpreter for them all (torch is imported once), which forgets transferlab's
    # modules before importing each stage's: what a stage lists is then what it imports itself.
    code = ("import importlib, json, sys\n"
            "found = {}\n"
            "for module in sys.argv[1:]:\n"
            "    for name in [n for n in sys.modules if n.split('.')[0] == 'transferlab']:\n"
            "        del sys.modules[name]\n"
            "    importlib.import_module(module)\n"
            "    found[module] = [m.__file__ for n, m in sys.modules.items()\n"
            "                     if n.split('.')[0] == 'transferlab' and getattr(m, '__file__', None)]\n"
            "print(json.dumps(found))")
    stage_modules = sorted(set(modules.values()))
    imported = json.loads(run([sys.executable, "-c", code, *stage_modules], root, dict(os.environ)).stdout)
    for name, stage in stages.items():
        used = {Path(f).resolve().relative_to(root / "src/transferlab").as_posix() for f in imported[modules[name]]}
        listed = {d.removeprefix("src/transferlab/") for d in stage["deps"] if d.startswith("src/transferlab/")}
        assert used - PLUMBING <= listed, f"{name}: dvc.yaml does not list {sorted(used - PLUMBING - listed)}"
        assert listed <= used, f"{name}: dvc.yaml lists {sorted(listed - used)}, which it does not run"


def test_fifty_classes_run_the_whole_pipeline_and_stay_legible(tmp_path):
    """A user's own folder of many classes: one sub-folder per class, val and test split off."""
    from conftest import make_image

    data = tmp_path / "fifty"
    for c in range(50):
        for i in range(3):  # 1 train, 1 val, 1 test each
            make_image(data / f"species number {c:02d}" / f"{i}.jpg", ((c * 37) % 256, (c * 91) % 256, 90), c * 10 + i)
    project = copy_project(tmp_path / "project")
    set_params(project, data={"url": str(data)}, train={"epochs": 1, "batch_size": 8, **PINNED_HARDWARE},
               split={"val_fraction": 0.5, "test_fraction": 0.3333})  # a third, then half the rest: one each
    params = yaml.safe_load((project / "params.yaml").read_text())
    modes_follow_train(params)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    torch_home = tmp_path / "torch_home"
    write_test_weights(torch_home, "squeezenet1_0")
    env = pipeline_env(torch_home)
    run(["dvc", "repro"], project, env)
    report = json.loads((project / "data/split/report.json").read_text())
    assert len(report["classes"]) == 50 and sum(report["counts"]["test"].values()) == 50
    details = json.loads((project / "reports/eval.json").read_text())
    assert len(details["finetune"]["confusion"]) == 50 and len(details["finetune"]["most_confused"]) <= 10
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], project, env).stdout)
    numbers = [v for files in shown.values() for f in files["data"].values() for m in f["data"].values()
               for v in (m.values() if isinstance(m, dict) else [m])]
    assert len(numbers) <= 3 * 5 + 3 * 3  # not 50 x 50
    for png in ("confusion", "test_predictions", "test_accuracy"):
        assert (project / f"plots/{png}.png").read_bytes()[:4] == b"\x89PNG"


def test_the_shipped_mode_recipes_run_through_the_pipeline(tmp_path):
    """The other tiny projects make every mode follow `train` (modes_follow_train); this one keeps
    params.yaml's own mode sections (AdamW, cosine and patience for scratch; finetune's and
    extract's learning rates) and caps only the epochs, so the shipped recipes' code runs too."""
    from conftest import tiny_project

    project, env = tiny_project(tmp_path, epochs=2, batch_size=4)
    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params = yaml.safe_load((project / "params.yaml").read_text())
    for mode in MODES:
        params[mode] = {**shipped[mode], **({"epochs": 3} if mode == "scratch" else {})}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit(project, "shipped mode recipes")
    run(["dvc", "repro"], project, env)
    from transferlab.files import load_checkpoint

    for mode in MODES:
        trained = load_checkpoint(project / f"models/{mode}.pt")["params"]["train"]  # the settings it trained with
        expected = {key: value for key, value in params[mode].items() if value is not None}
        assert {key: trained[key] for key in expected} == expected, mode
        assert trained["freeze"] == {"extract": "all"}.get(mode, "none")
    assert json.loads((project / "metrics/eval.json").read_text()).keys() == set(MODES)
