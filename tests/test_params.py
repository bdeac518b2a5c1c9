import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from transferlab.params import ParamsError, load_curve_params, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_project_params_load_with_tutorial_defaults():
    params = load_params(ROOT / "params.yaml")
    assert params.model == "squeezenet"
    assert (params.train.batch_size, params.train.epochs, params.train.lr, params.train.momentum) == (8, 15, 0.001, 0.9)
    assert params.data.url == "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
    # Each mode's own best, chosen on val (docs/recipes.md); the tutorial's recipe stays in train.
    assert (params.finetune.lr, params.finetune.patience, params.finetune.epochs) == (0.003, 5, 15)
    assert (params.extract.lr, params.extract.patience, params.extract.freeze) == (0.01, 5, "all")
    scratch = params.for_mode("scratch")
    assert (scratch.optimizer, scratch.lr, scratch.scheduler, scratch.epochs, scratch.patience, scratch.min_epochs) == (
        "adamw", 0.003, "cosine", 40, 10, 20)


def test_mode_overrides_apply_to_that_mode_only(raw):
    raw["scratch"] = {"lr": 0.01, "epochs": 30}
    params = parse_params(raw)
    assert (params.for_mode("scratch").lr, params.for_mode("scratch").epochs) == (0.01, 30)
    assert params.for_mode("finetune").epochs == params.train.epochs == 15
    assert params.for_mode("scratch").batch_size == params.train.batch_size


def test_exponent_without_dot_is_a_float(raw):
    # `dvc exp run -S train.lr=1e-5` writes 1e-05, which YAML 1.1 reads as a string.
    raw["train"]["lr"] = yaml.safe_load("lr: 1e-05")["lr"]
    assert raw["train"]["lr"] == "1e-05"
    assert parse_params(raw).train.lr == pytest.approx(1e-5)


@pytest.mark.parametrize("edit, key, words", [
    (lambda r: r["train"].update(lrr=0.1), "train.lrr", "did you mean 'lr'"),
    (lambda r: r.update(modle="resnet"), "modle", "did you mean 'model'"),
    (lambda r: r["train"].update(epochs="ten"), "train.epochs", "whole number"),
    (lambda r: r["train"].update(epochs=2.5), "train.epochs", "whole number"),
    (lambda r: r["train"].update(epochs=True), "train.epochs", "whole number"),
    (lambda r: r["train"].update(lr="fast"), "train.lr", "expected a number"),
    (lambda r: r["train"].update(epochs=0), "train.epochs", "greater than 0"),
    (lambda r: r["train"].update(batch_size=-8), "train.batch_size", "greater than 0"),
    (lambda r: r["train"].update(lr=-0.001), "train.lr", "greater than 0"),
    (lambda r: r["train"].update(momentum=-1), "train.momentum", "0 or more"),
    (lambda r: r["train"].update(optimizer="adamax"), "train.optimizer", "sgd, adam, adamw"),
    (lambda r: r["train"].update(channels_last="maybe"), "train.channels_last", "true or false"),
    (lambda r: r["train"].update(keep_freed_memory="yes"), "train.keep_freed_memory", "true or false"),
    (lambda r: r["train"].update(workers=-1), "train.workers", "0 or more"),
    (lambda r: r["train"].update(processes=0), "train.processes", "1 or more, or auto"),
    (lambda r: r["train"].update(processes="many"), "train.processes", "auto"),
    (lambda r: r["split"].update(val_fraction=1.5), "split.val_fraction", "between 0 and 1"),
    (lambda r: r["data"].update(sha256="abc"), "data.sha256", "64 hex digits"),
    (lambda r: r["evaluate"].update(batch_size=0), "evaluate.batch_size", "greater than 0"),
    (lambda r: r["split"].update(near_duplicate_distance=65), "split.near_duplicate_distance", "0..64"),
    (lambda r: r["split"].update(train_per_class=0), "split.train_per_class", "1 or more"),
    (lambda r: r["split"].update(train_per_class="most"), "split.train_per_class", "all"),
    (lambda r: r["evaluate"].update(precision="fp8"), "evaluate.precision", "fp32"),
    (lambda r: r["evaluate"].update(tta=["bogus"]), "evaluate.tta", "'bogus' is not a view; valid views: center"),
    (lambda r: r["evaluate"].update(tta=["center", "hlfip"]), "evaluate.tta", "'hlfip' is not a view; did you mean"),
    (lambda r: r["evaluate"].update(tta=[]), "evaluate.tta", "is empty; list at least one view (valid views: center"),
    (lambda r: r["evaluate"].update(tta=["center", "hflip", "center"]), "evaluate.tta", "lists a view twice"),
    (lambda r: r["evaluate"].update(tta="hflip"), "evaluate.tta", "expected a list"),
    (lambda r: r.pop("seed"), "seed", "missing"),
    (lambda r: r["train"].pop("lr"), "train.lr", "missing"),
    (lambda r: r.pop("extract"), "extract", "section is missing"),
    (lambda r: r.update(finetune=[1]), "finetune", "mapping"),
    (lambda r: r["finetune"].update(lr=0), "finetune.lr", "greater than 0"),
    (lambda r: r["scratch"].update(epoch=3), "scratch.epoch", "did you mean 'epochs'"),
    (lambda r: r.update(model="resnet19"), "model", "resnet18"),
    (lambda r: r.update(model="squeezenet2"), "model", "squeezenet"),
])
def test_bad_values_name_the_key(raw, edit, key, words):
    edit(raw)
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    message = str(err.value)
    assert message.startswith(f"{key}:"), message
    assert words in message


def test_tta_defaults_to_the_centre_crop_alone(raw):
    assert parse_params(raw).evaluate.tta == ("center",)  # params.yaml's value
    del raw["evaluate"]["tta"]
    assert parse_params(raw).evaluate.tta == ("center",)  # a params.yaml from before the key
    raw["evaluate"]["tta"] = ["hflip", "center"]
    assert parse_params(raw).evaluate.tta == ("hflip", "center")


def test_any_torchvision_model_and_lite0_are_accepted(raw):
    for name in ("resnet50", "vit_b_16", "efficientnet_lite0", "densenet"):
        raw["model"] = name
        assert parse_params(raw).model == name


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="bad.yaml: is not valid YAML"):
        load_params(bad)


def test_stages_that_build_no_model_skip_its_check_and_torch(raw):
    raw["model"] = "resnet19"
    assert parse_params(raw, check_model=False).model == "resnet19"  # the train stage will refuse it
    code = ("import sys; from transferlab.params import load_params; "
            f"load_params({str(ROOT / 'params.yaml')!r}, check_model=False); print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_recipe_params_are_checked(raw):
    raw["finetune"].update(freeze=0.5, head_epochs=2, backbone_lr_factor=0.1)
    raw["train"].update(head="mlp", head_hidden=[256, 64], optimizer="adam", scheduler="onecycle")
    params = parse_params(raw, check_model=False)
    finetune = params.for_mode("finetune")
    assert (finetune.freeze, finetune.head_epochs, finetune.backbone_lr_factor) == (0.5, 2, 0.1)
    assert params.train.head_hidden == (256, 64) and params.for_mode("extract").freeze == "all"
    assert parse_params({**raw, "finetune": {"freeze": "layer2"}}, check_model=False).finetune.freeze == "layer2"


@pytest.mark.parametrize("edit, key, words", [
    (lambda r: r["scratch"].update(freeze="all"), "scratch.freeze", "frozen random weights learn nothing"),
    (lambda r: r["finetune"].update(freeze=1.5), "finetune.freeze", "lies in [0, 1]"),
    (lambda r: r["train"].update(head_hidden=[0]), "train.head_hidden", "positive layer sizes"),
    (lambda r: r["train"].update(head_hidden=256), "train.head_hidden", "expected a list"),
    (lambda r: r["train"].update(scheduler="onecycle", warmup_epochs=2), "train.warmup_epochs", "onecycle"),
    (lambda r: r["train"].update(backbone_lr_factor=0), "train.backbone_lr_factor", "greater than 0"),
    (lambda r: r["train"].update(label_smoothing=1.0), "train.label_smoothing", "in [0, 1)"),
    (lambda r: r["train"].update(mixup_alpha=-0.2), "train.mixup_alpha", "0 (off) or more"),
    (lambda r: r["finetune"].update(cutmix_alpha=-1), "finetune.cutmix_alpha", "0 (off) or more"),
    (lambda r: r["train"].update(ema_decay=1.0), "train.ema_decay", "a decay in (0, 1)"),
    (lambda r: r["train"].update(augment="autoaugment"), "train.augment", "none, trivialaugment, randaugment"),
    # extract's frozen backbone trains its head on cached embeddings, which cannot be mixed
    (lambda r: r["train"].update(mixup_alpha=0.2), "extract.mixup_alpha", "set extract.cache_features: false"),
    (lambda r: r["extract"].update(cutmix_alpha=1.0), "extract.cutmix_alpha", "++extract.cache_features=false"),
])
def test_recipe_mistakes_name_the_key(raw, edit, key, words):
    edit(raw)
    with pytest.raises(ParamsError, match=f"^{re.escape(key)}: .*{re.escape(words)}"):
        parse_params(raw, check_model=False)


def test_the_curve_params_load_and_their_mistakes_name_the_key(tmp_path):
    curve = load_curve_params(Path(__file__).resolve().parents[1] / "curves/params.yaml")
    assert curve.images_per_class == (2, 5, 10, 20, 50, "all") and curve.budget == "steps"
    path = tmp_path / "params.yaml"
    for text, words in (("curve: {images_per_class: [2, 0], seeds: [0], modes: [extract], budget: steps}",
                         "curve.images_per_class: is [2, 0]; each is 1 or more, or all"),
                        ("curve: {images_per_class: [2], seeds: [0, 0], modes: [extract], budget: steps}",
                         "curve.seeds: [0, 0] lists a value twice"),
                        ("curve: {images_per_class: [2], seeds: [0], modes: [frozen], budget: steps}",
                         "curve.modes[0]: 'frozen' is not one of finetune, extract, scratch"),
                        ("curve: {images_per_class: [2], seeds: [0], modes: [extract], budget: time}",
                         "curve.budget: 'time' is not one of steps, epochs")):
        path.write_text(text)
        with pytest.raises(ParamsError) as err:
            load_curve_params(path)
        assert str(err.value) == f"{path}: {words}"



def test_regularisation_keys_are_off_by_default_and_usable_in_any_mode(raw):
    params = parse_params(raw, check_model=False)
    train = params.train
    assert (train.label_smoothing, train.mixup_alpha, train.cutmix_alpha, train.augment, train.ema_decay) == \
        (0.0, 0.0, 0.0, "none", 0.0)
    raw["scratch"].update(label_smoothing=0.1, mixup_alpha=0.2, cutmix_alpha=1.0, augment="trivialaugment",
                          ema_decay=0.99)
    scratch = parse_params(raw, check_model=False).for_mode("scratch")
    assert (scratch.label_smoothing, scratch.mixup_alpha, scratch.augment, scratch.ema_decay) == \
        (0.1, 0.2, "trivialaugment", 0.99)


def test_mixing_trains_extract_once_its_backbone_runs_every_epoch(raw):
    raw["train"].update(mixup_alpha=0.2, cutmix_alpha=1.0)
    raw["extract"].update(cache_features=False)
    assert parse_params(raw, check_model=False).for_mode("extract").mixup_alpha == 0.2


def test_the_documented_tutorial_command_trains_every_mode_with_trains_recipe():
    """docs/recipes.md's `dvc exp run -n tutorial -S ...`: with those keys null, every mode's params
    are `train`'s (the tutorial's), freeze aside; without them, each mode has its own."""
    command = next(line.strip() for line in (ROOT / "docs/recipes.md").read_text().splitlines()
                   if line.strip().startswith("dvc exp run -n tutorial"))
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    shipped = parse_params(raw, check_model=False)
    for setting in re.findall(r"-S (\S+)", command):
        key, value = setting.split("=", 1)
        section, name = key.split(".")
        raw[section][name] = yaml.safe_load(value)
    tutorial = parse_params(raw, check_model=False)
    for mode in ("finetune", "extract", "scratch"):
        assert replace(tutorial.for_mode(mode), freeze=tutorial.train.freeze) == tutorial.train, mode
    assert shipped.scratch != replace(shipped.train, freeze=shipped.scratch.freeze)
