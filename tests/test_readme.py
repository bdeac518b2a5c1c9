"""Every command the README shows is run by a test or by CI: this file says where, and fails when
the README shows a command that nothing here accounts for (a documented command that fails is a bug,
and one that nothing runs will, one day)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Pattern of a README command -> the test (or CI step) that runs it in that form.
RUN_BY = {
    r"make repro": ".ci/run installs with the Makefile; tests/test_real_data.py runs the same dvc repro offline",
    r"make test": ".ci/run",
    r"make bench": "benchmarks/speed.py, run by hand (a benchmark, not a test)",
    r"dvc exp run -S model=resnet": "tests/test_pipeline.py::test_repro_then_experiment_then_metrics_diff",
    r"dvc exp run -S scratch\.lr=\S+ -S scratch\.epochs=\S+": "tests/test_stages.py::test_documented_per_mode_overrides_work_as_written",
    r"dvc exp run -S \+\+scratch\.gamma=\S+": "tests/test_stages.py::test_documented_per_mode_overrides_work_as_written",
    r"dvc exp show --only-changed": "tests/test_readme.py::test_exp_show_only_changed_is_a_dvc_option",
    r"dvc metrics diff \S+ \S+": "tests/test_pipeline.py (dvc metrics diff between revisions)",
    r"dvc plots diff \S+ \S+": "tests/test_pipeline.py::test_repro_then_experiment_then_metrics_diff (offline)",
    r"dvc plots show": "tests/test_pipeline.py::test_repro_then_experiment_then_metrics_diff (offline)",
    r"dvc exp run --queue -S model=\S+ -S seed=\S+": "tests/test_remote.py::test_a_sweep_queued_two_at_once_is_ranked_pushed_and_ranked_alike_on_another_machine",
    r"dvc exp run --temp -S model=\S+ -S seed=\S+": "tests/test_remote.py (run_sweep runs a task that DVC's queue race failed again this way)",
    r"dvc queue start -j \d": "tests/test_remote.py",
    r"dvc queue status": "tests/test_remote.py (wait_for_queue)",
    r"transferlab compare( \S+ \S+)?$": "tests/test_compare.py, tests/test_stages.py, tests/test_remote.py",
    r"dvc exp run -n \S+( -S \S+)+": "tests/test_stages.py::test_training_recipes_through_dvc_exp_run_and_compare_ranks_them",
    r"transferlab predict \S+ .*--csv .*": "tests/test_predict.py::test_predict_command_writes_table_csv_json_and_grid",
    r"transferlab export \S+ --out \S+": "tests/test_export.py::test_export_command",
    r"transferlab cache( --prune \d+)?": "tests/test_caches.py::test_cache_command_reports_and_prunes",
    r"dvc remote add -d storage s3://\S+": "tests/test_remote.py",
    r"dvc remote modify storage endpointurl \S+": "tests/test_remote.py",
    r"dvc push": "tests/test_remote.py",
    r"dvc pull": "tests/test_remote.py",
    r"git push": "tests/test_remote.py",
    r"dvc exp push origin --rev HEAD": "tests/test_remote.py",
    r"dvc exp pull origin --rev HEAD": "tests/test_remote.py",
    r"TRANSFERLAB_DATA_MIRROR=\S+ dvc exp run -S model=efficientnet_lite0": "tests/test_real_data.py (the mirror, offline)",
    r"dvc exp run -S train\.processes=2": "tests/test_distributed.py::test_processes_2_through_dvc_exp_run_a_killed_process_stops_it_and_it_resumes",
    r"torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint \S+ -m transferlab\.stages\.train \w+":
        "tests/test_distributed.py::test_the_stage_runs_under_torchrun_as_on_two_machines (both agents here)",
    r"dvc commit -f train-finetune": "tests/test_distributed.py::test_the_stage_runs_under_torchrun_as_on_two_machines",
    r"dvc repro curves/dvc\.yaml": "tests/test_curves.py::test_a_curve_through_dvc_runs_new_points_only_continues_after_ctrl_c_and_shares_its_caches",
    r"dvc plots show learning_curve": "tests/test_curves.py::test_a_curve_through_dvc_runs_new_points_only_continues_after_ctrl_c_and_shares_its_caches",
    r"python benchmarks/\w+\.py.*": "benchmarks, run by hand; their figures are in this README",
    r"from transferlab import Classifier": "tests/test_predict.py::test_three_lines_from_checkpoint_to_predictions",
    r"classifier = Classifier\.load\(.*\)": "tests/test_predict.py::test_three_lines_from_checkpoint_to_predictions",
    r"for p in classifier\.predict\(.*": "tests/test_predict.py::test_three_lines_from_checkpoint_to_predictions",
    r"transferlab (train|STAGE): .*": "a message the README quotes, not a command",
    r"\"most_confused\": .*": "an excerpt of reports/eval.json, not a command",
    r"near-copies \(perceptual-hash distance .*": "a line the split stage prints, not a command",
}


def readme_commands() -> list[str]:
    """The lines of the README's code blocks (indented 4, or 6 inside a list), comments cut off;
    not the pipeline diagram, not the file layout."""
    text = (ROOT / "README.md").read_text().split("\n## Layout")[0]
    commands = []
    for line in text.splitlines():
        match = re.match(r"^(?: {4}| {6})(\S.*)$", line)
        if match and "──" not in line:
            commands.append(re.split(r"\s+#\s", match.group(1))[0].strip())
    return commands


def test_every_readme_command_is_run_somewhere():
    unaccounted = [c for c in readme_commands() if not any(re.fullmatch(p, c) for p in RUN_BY)]
    assert not unaccounted, f"README commands no test or CI step runs: {unaccounted}"
    assert len(readme_commands()) > 20


def test_exp_show_only_changed_is_a_dvc_option():
    import subprocess
    import sys

    dvc = str(Path(sys.executable).parent / "dvc")
    usage = subprocess.run([dvc, "exp", "show", "--help"], capture_output=True, text=True).stdout
    assert "--only-changed" in usage
