"""Learning curves: nested subsets, the training budget, the dividend and the crossover on
synthetic curves whose answers are known; then a curve through `transferlab curve` (which runs
`dvc repro curves/dvc.yaml`)."""
import json
import math
import signal

import numpy as np
import pytest
import yaml
from conftest import copy_finished, interrupt, run

from transferlab import curves
from transferlab.curve_point import training_rows
from transferlab.images import Sample
from transferlab.subsets import per_class_subset


def pool(counts: dict[str, int]) -> list[Sample]:
    return [Sample(f"data/raw/{label}/{i:03d}.jpg", label) for label, n in counts.items() for i in range(n)]


def test_subsets_are_nested_reproducible_and_seeded():
    train = pool({"ants": 30, "bees": 30})
    for seed in (0, 1):
        drawn = [set(per_class_subset(train, n, seed)[0]) for n in (2, 5, 10, None)]
        assert all(small < large for small, large in zip(drawn, drawn[1:]))  # strictly nested
        assert drawn[-1] == set(train)
        assert per_class_subset(train, 5, seed) == per_class_subset(list(reversed(train)), 5, seed)
    assert set(per_class_subset(train, 5, 0)[0]) != set(per_class_subset(train, 5, 1)[0])
    subset, summary = per_class_subset(train, 5, 0)
    assert summary["counts"] == {"ants": 5, "bees": 5} and summary["classes_with_fewer"] == {}


def test_a_class_with_fewer_images_gives_all_it_has_and_says_so():
    subset, summary = per_class_subset(pool({"ants": 3, "bees": 30}), 10, 0)
    assert summary["counts"] == {"ants": 3, "bees": 10}
    assert summary["classes_with_fewer"] == {"ants": 3}


@pytest.mark.parametrize("per_class", [1, 2, 7, 20, None])
def test_the_steps_budget_gives_every_size_the_epoch_of_the_whole_set(per_class):
    train = pool({"ants": 23, "bees": 20})
    rows, drawn = training_rows(train, per_class, 0, "steps")
    subset = {train.index(s) for s in per_class_subset(train, per_class, 0)[0]}
    assert len(rows) == len(train)  # as many images an epoch as all of train: the same optimizer steps
    assert set(rows) == subset
    taken = np.bincount(rows)[sorted(subset)]
    assert taken.max() - taken.min() <= 1  # each subset image equally often, give or take the remainder
    fixed, _ = training_rows(train, per_class, 0, "epochs")
    assert sorted(fixed) == sorted(subset)  # fixed epochs: the subset once an epoch


SCRATCH = [(2, 0.5), (20, 0.7), (200, 0.9)]


@pytest.mark.parametrize("accuracy, expected", [
    (0.7, ("=", 20)),                       # on a measured point
    (0.8, ("=", math.sqrt(20 * 200))),      # halfway in accuracy: halfway on log n
    (0.95, (">", 200)),                     # never: more than the largest size
    (0.4, ("<=", 2)),                       # already at the smallest size
])
def test_images_to_reach_interpolates_on_log_n(accuracy, expected):
    relation, images = curves.images_to_reach(SCRATCH, accuracy)
    assert relation == expected[0] and images == pytest.approx(expected[1])


def test_a_size_at_least_every_class_count_draws_the_all_points_training():
    train = pool({"ants": 8, "bees": 6})
    everything, drawn = training_rows(train, 50, 3, "steps")
    assert drawn["everything"] and everything == training_rows(train, None, 3, "steps")[0]
    assert not training_rows(train, 7, 3, "steps")[1]["everything"]  # bees give all 6, ants 7 of 8


def points_for(accuracy: dict[tuple[str, object], float], seeds: int = 3, images: int = 300,
               class_sizes: dict[str, int] | None = None) -> list[dict]:
    """Synthetic points: (mode, size) right on about `accuracy` of the test images, the same hard
    images for every mode and size (one difficulty per image), each seed flipping a few of its
    own. A size draws what a real split would: at most each class's images (`class_sizes`)."""
    class_sizes = class_sizes or {"a": 500, "b": 500}
    rng = np.random.default_rng(0)
    difficulty = rng.random(images)
    points = []
    for (mode, size), share in accuracy.items():
        for seed in range(seeds):
            right = difficulty < share
            flips = rng.choice(images, 3, replace=False)  # seed-to-seed noise
            right[flips] = ~right[flips]
            counts = {c: n if size == "all" else min(size, n) for c, n in class_sizes.items()}
            fewer = {c: n for c, n in class_sizes.items() if size != "all" and n < size}
            points.append({"mode": mode, "images_per_class": size, "seed": seed,
                           "drawn": {"counts": counts, "classes_with_fewer": fewer},
                           "right": "".join("1" if r else "0" for r in right)})
    return points


def test_the_dividend_says_how_many_times_the_data_imagenet_weights_are_worth():
    accuracy = {("scratch", 2): 0.5, ("scratch", 20): 0.7, ("scratch", 200): 0.9,
                ("finetune", 2): 0.7, ("finetune", 20): 0.95, ("finetune", 200): 0.95, ("extract", 2): 0.45}
    points = points_for(accuracy)
    found = {(d["mode"], d["x"]): d for d in curves.dividend(points, curves.table(points))}
    assert found["finetune", 2]["verdict"] == "better"
    assert found["finetune", 2]["factor"] == pytest.approx(10, rel=0.3)
    assert "ImageNet weights are worth about" in found["finetune", 2]["says"]
    assert found["finetune", 20]["scratch_needs"] == ">"
    assert "worth more than 10.0x the data" in found["finetune", 20]["says"]  # more than the 200 there are
    assert found["finetune", 200]["says"].endswith("does not reach it with all the 200 per class there are")
    # Not better than scratch by the paired test: no dividend is claimed at all.
    assert found["extract", 2]["factor"] is None and found["extract", 2]["verdict"] != "better"
    assert "no dividend is measured there" in found["extract", 2]["says"]


def test_a_dividend_needs_the_paired_test_not_only_a_higher_mean():
    """Ten classes at 2 images each: finetune 13% and scratch 10% of 30 test images, one seed:
    a higher mean, but nothing the test can tell from chance."""
    points = points_for({("finetune", 2): 0.133, ("scratch", 2): 0.1, ("scratch", 20): 0.12}, seeds=1, images=30)
    (claim,) = [d for d in curves.dividend(points, curves.table(points)) if d["mode"] == "finetune"]
    assert claim["verdict"] != "better" and claim["factor"] is None
    assert "worth" not in claim["says"] and "no dividend is measured there" in claim["says"]


def test_sizes_that_draw_every_image_share_the_all_points_x_and_are_its_row():
    """Classes of 30: sizes 50 and all both draw 30 per class. The summary neither crashes on the
    tie nor shows one training twice."""
    accuracy = {(mode, size): share for mode, share in (("finetune", 0.9), ("extract", 0.8), ("scratch", 0.6))
                for size in (2, 50, "all")}
    points = points_for(accuracy, class_sizes={"ants": 30, "bees": 30})
    rows = curves.table(points)
    assert sorted(r["x"] for r in rows if r["mode"] == "scratch") == [2, 30, 30]
    curves.markdown(rows, curves.dividend(points, rows), curves.crossover(points, rows))  # no TypeError on the tie
    # As the point stage leaves them: the size-50 points trained nothing, and say so.
    staged = [{**p, "same_as": "all"} if p["images_per_class"] == 50 else p for p in points]
    trained, merged = curves.merge_everything(staged, [2, 50, "all"])
    assert merged == {"all": [50]} and all(p["images_per_class"] != 50 for p in trained)
    rows = curves.table(trained)
    text = curves.markdown(rows, curves.dividend(trained, rows), curves.crossover(trained, rows), merged)
    assert "| all (30) = 50 |" in text and "- 50 per class draw every training image" in text
    _, without_all = curves.merge_everything([p for p in staged if p["images_per_class"] != "all"], [2, 50])
    assert "add all to curve.images_per_class" in curves.markdown(rows, [], {"says": "x"}, without_all)


def crossover_points(gaps: dict[int, int], seeds: int = 3, images: int = 300) -> list[dict]:
    """Synthetic points: extract right on 70% of the test images at every size; finetune on
    `gaps[n]` more, each seed with a little spread of its own. Classes of 60 and 40 images."""
    rng = np.random.default_rng(0)
    points = []
    for n, gap in gaps.items():
        for seed in range(seeds):
            base = rng.random(images) < 0.7
            for mode, extra in (("extract", 0), ("finetune", gap)):
                right = base.copy()
                right[np.flatnonzero(~right)[:extra]] = True
                flips = rng.choice(images, 3, replace=False)  # seed-to-seed noise
                right[flips] = ~right[flips]
                points.append({"mode": mode, "images_per_class": n, "seed": seed, "drawn": {
                    "counts": {"a": min(n, 60), "b": min(n, 40)}, "classes_with_fewer": {}},
                    "right": "".join("1" if r else "0" for r in right)})
    return points


def test_the_crossover_is_the_smallest_size_where_finetune_beats_extract():
    points = crossover_points({2: 0, 10: 1, 30: 40, 100: 45})
    cross = curves.crossover(points, curves.table(points))
    assert cross["from_images_per_class"] == 30
    assert "first beats extract at 30 images per class" in cross["says"]
    assert [t["verdict"] for t in cross["tests"]][2:] == ["better", "better"]


def test_the_crossover_says_never_up_to_the_largest_size():
    points = crossover_points({2: 0, 10: 1, 30: 0})
    cross = curves.crossover(points, curves.table(points))
    assert cross["from_images_per_class"] is None
    assert "never beats it, up to 30 images per class" in cross["says"]


def test_a_curve_of_one_mode_says_what_it_cannot_answer():
    points = [p for p in crossover_points({2: 0, 10: 1}) if p["mode"] == "extract"]
    rows = curves.table(points)
    cross = curves.crossover(points, rows)
    assert cross["from_images_per_class"] is None and "needs finetune and extract" in cross["says"]
    assert "no dividend: it needs scratch" in curves.markdown(rows, curves.dividend(points, rows), cross)


def test_the_table_gives_each_mode_and_size_its_mean_and_interval():
    points = crossover_points({5: 30})
    rows = {r["mode"]: r for r in curves.table(points)}
    for mode, r in rows.items():
        assert r["seeds"] == [0, 1, 2] and r["x"] == 5
        assert r["ci95_low"] < r["accuracy"] < r["ci95_high"]
        assert r["accuracy"] == pytest.approx(np.mean(r["accuracy_per_seed"]))
    assert rows["finetune"]["accuracy"] - rows["extract"]["accuracy"] == pytest.approx(0.1, abs=0.01)
    text = curves.markdown(list(rows.values()), [], {"says": "x"})
    assert text.splitlines()[0] == "| images per class | finetune | extract |"
    rows["extract"]["classes_with_fewer"] = {"bees": 3}
    assert "- at 5 per class, classes with fewer train on all they have: bees 3" in curves.markdown(
        list(rows.values()), [], {"says": "x"})


def set_curve(project, **values) -> None:
    path = project / "curves/params.yaml"
    params = yaml.safe_load(path.read_text())
    params["curve"].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def ran_points(stdout: str) -> list[str]:
    return [line.split("point@")[1].rstrip("':") for line in stdout.splitlines()
            if line.startswith("Running stage 'curves/dvc.yaml:point@")]


@pytest.mark.integration
def test_a_curve_through_dvc_runs_new_points_only_continues_after_ctrl_c_and_shares_its_caches(finished_project,
                                                                                                 tmp_path):
    project, env = copy_finished(finished_project, tmp_path / "project")  # squeezenet, 2 epochs, batch 4
    env["TRANSFERLAB_CACHE_DIR"] = str(tmp_path / "cache")  # its own: the caches this curve made, counted
    set_curve(project, images_per_class=[2, 50, "all"], modes=["extract", "scratch"], seeds=[0])
    assert not (project / "curves/dvc.yaml").exists()  # nobody asked for a curve yet: dvc status stays clean

    first = run(["transferlab", "curve"], project, env)
    assert ran_points(first.stdout) == ["2-extract-0", "2-scratch-0", "50-extract-0", "50-scratch-0",
                                        "all-extract-0", "all-scratch-0"]
    assert "Running stage 'train-" not in first.stdout  # the main pipeline's training is not part of it
    report = json.loads((project / "curves/curve.json").read_text())
    assert {(r["mode"], r["images_per_class"]) for r in report["rows"]} == {
        (m, s) for m in ("extract", "scratch") for s in (2, "all")}
    assert [r["x"] for r in report["rows"] if r["mode"] == "scratch"] == [2, 6]  # 8 a class, minus val's share
    # 50 per class is more than any class has: the all point's training, not repeated, and said so.
    assert json.loads((project / "curves/points/scratch-50-s0.json").read_text())["same_as"] == "all"
    assert report["same_as_all"] == [50] and "| all (6) = 50 |" in (project / "curves/curve.md").read_text()
    assert run(["dvc", "status"], project, env).stdout.strip() == "Data and pipelines are up to date."

    # What no point reads re-runs no point: the summary's code, the split's report, train keys
    # that change no result.
    with open(project / "src/transferlab/curves.py", "a") as f:
        f.write("# a change to the summary alone\n")
    report_path = project / "data/split/report.json"
    report_path.write_text(report_path.read_text().replace('"classes"', '"classes" ', 1))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(workers=1, resume=False)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    again = run(["transferlab", "curve"], project, env)
    assert ran_points(again.stdout) == [] and "Running stage 'curves/dvc.yaml:summary'" in again.stdout
    point = json.loads((project / "curves/points/scratch-2-s0.json").read_text())
    assert point["drawn"]["counts"] == {"ants": 2, "bees": 2} and point["steps_per_epoch"] == 3  # 12 images / 4
    cache = tmp_path / "cache"
    assert len(list(cache.glob("decoded-*[!k]"))) == 1  # one decode (the .lock files aside)
    assert len(list(cache.glob("features-*[!k]"))) == 1  # both extract points: one embedding pass
    assert (project / "curves/plots/learning_curve.png").stat().st_size > 0
    run(["dvc", "plots", "show", "learning_curve"], project, env)  # the README's command, offline
    page = (project / "dvc_plots/index.html").read_text()
    assert "vegaEmbed('#learning_curve'" in page and "<script src=" not in page
    assert '"scale": {"type": "log"}' in page and '"mode": "scratch"' in page  # log x, a line per mode

    # A seed added, and the curve stopped by Ctrl-C once its first new point is done: the run
    # starts with the new points only, and the next run continues with the rest of them.
    set_curve(project, seeds=[0, 1])
    code, _ = interrupt(["dvc", "repro", "curves/dvc.yaml"], project, env,
                        "Running stage 'curves/dvc.yaml:point@2-scratch-1'", signal.SIGINT, group=True)
    assert code != 0
    assert (project / "curves/points/extract-2-s1.json").exists()
    assert not (project / "curves/points/scratch-2-s1.json").exists()
    second = run(["dvc", "repro", "curves/dvc.yaml"], project, env)
    assert ran_points(second.stdout) == ["2-scratch-1", "50-extract-1", "50-scratch-1", "all-extract-1",
                                         "all-scratch-1"]
    assert len(list(cache.glob("features-*[!k]"))) == 1
    report = json.loads((project / "curves/curve.json").read_text())
    assert report["seeds"] == [0, 1] and all(r["seeds"] == [0, 1] for r in report["rows"])


def test_transferlab_curve_passes_dvc_options_on_and_says_where_it_must_run(tmp_path, monkeypatch, capsys):
    from transferlab.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["curve", "--dry", "-v"]) == 1  # options for dvc repro are taken, not refused
    assert "curves/pipeline.yaml is missing: run transferlab curve from the project's root" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["cache", "--dry"])  # the other verbs still refuse what they do not know


def test_more_than_n_times_the_data_rests_on_scratch_at_the_largest_size():
    """Finetune at 2 per class is far better than scratch at 2, but hardly better than scratch at
    all the data: "worth more than 14x the data" would claim what the test does not show."""
    points = points_for({("finetune", 2): 0.133, ("scratch", 2): 0.10, ("scratch", 28): 0.125}, images=600)
    rows = curves.table(points)
    (claim,) = [d for d in curves.dividend(points, rows) if d["mode"] == "finetune"]
    assert claim["against_scratch_at"] == 28 and claim["factor"] is None
    assert "against scratch at 28 per class" in claim["says"] and "worth" not in claim["says"]
    same_size = curves.size_tests(points, rows, "finetune", "scratch")  # at 2 per class alone it is clear
    assert same_size[0]["verdict"] == "better"


def test_a_point_depends_on_every_train_key_that_changes_its_result():
    """The point's params list the train keys one by one (not processes, resume or workers): a
    key added to TrainParams and forgotten there would change points without re-running them."""
    import dataclasses
    from pathlib import Path

    from transferlab.params import TrainParams

    pipeline = yaml.safe_load((Path(__file__).resolve().parents[1] / "curves/pipeline.yaml").read_text())
    listed = {p.removeprefix("train.") for p in pipeline["stages"]["point"]["params"]
              if isinstance(p, str) and p.startswith("train.")}
    assert listed == {f.name for f in dataclasses.fields(TrainParams)} - {"processes", "resume", "workers"}
