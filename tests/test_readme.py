"""Every command the README shows is run by a test or by CI: this file says where, and fails when
the README shows a command that nothing here accounts for (a documented command that fails is a bug,
and one that nothing runs will, one day)."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = "tests/test_pipeline.py::test_repro_then_experiment_then_metrics_diff"
SWEEP = "tests/test_remote.py::test_a_sweep_queued_two_at_once_is_ranked_pushed_and_ranked_alike_on_another_machine"
OVERRIDES = "tests/test_stages.py::test_documented_per_mode_overrides_work_as_written"
TORCHRUN = "tests/test_distributed.py::test_the_stage_runs_under_torchrun_as_on_two_machines"
CURVE = ("tests/test_curves.py::"
         "test_a_curve_through_dvc_runs_new_points_only_continues_after_ctrl_c_and_shares_its_caches")
THREE_LINES = "tests/test_predict.py::test_three_lines_from_checkpoint_to_predictions"

# Pattern of a README command -> the tests that run it in that form (pytest node ids, which must exist).
RUN_BY = {
    r"make repro": "tests/test_real_data.py::test_transfer_learning_pays_off_on_hymenoptera",  # its dvc repro
    r"dvc exp run -S model=resnet": PIPELINE,
    r"dvc exp run -S scratch\.lr=\S+ -S scratch\.epochs=\S+": OVERRIDES,
    r"dvc exp run -S \+\+scratch\.gamma=\S+": OVERRIDES,
    r"dvc exp show --only-changed": "tests/test_readme.py::test_exp_show_only_changed_is_a_dvc_option",
    r"dvc metrics diff \S+ \S+": PIPELINE,
    r"dvc plots diff \S+ \S+": PIPELINE,
    r"dvc plots show": PIPELINE,
    r"dvc exp run --queue -S model=\S+ -S seed=\S+": SWEEP,
    r"dvc exp run --temp -S model=\S+ -S seed=\S+": SWEEP,  # run_sweep, for a task the queue's race failed
    r"dvc queue start -j \d": SWEEP,
    r"dvc queue status": SWEEP,
    r"transferlab compare( \S+ \S+)?$": (
        "tests/test_compare.py::test_compare_two_revisions_says_whether_the_second_beats_the_first", SWEEP),
    r"dvc exp run -n \S+( -S \S+)+": "tests/test_stages.py::test_training_recipes_through_dvc_exp_run_and_compare_ranks_them",
    r"transferlab predict \S+ .*--csv .*": "tests/test_predict.py::test_predict_command_writes_table_csv_json_and_grid",
    r"transferlab export \S+ --out \S+": "tests/test_export.py::test_export_command",
    r"transferlab cache( --prune \d+)?": "tests/test_caches.py::test_cache_command_reports_and_prunes",
    r"dvc remote add -d storage s3://\S+": SWEEP,
    r"dvc remote modify storage endpointurl \S+": SWEEP,
    r"dvc push": SWEEP,
    r"dvc pull": SWEEP,
    r"git push": SWEEP,
    r"dvc exp push origin --rev HEAD": SWEEP,
    r"dvc exp pull origin --rev HEAD": SWEEP,
    r"TRANSFERLAB_DATA_MIRROR=\S+ dvc exp run -S model=efficientnet_lite0":
        "tests/test_real_data.py::test_transfer_learning_pays_off_on_hymenoptera",  # the mirror, offline
    r"dvc exp run -S train\.processes=2":
        "tests/test_distributed.py::test_processes_2_through_dvc_exp_run_a_killed_process_stops_it_and_it_resumes",
    r"torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint \S+ -m transferlab\.stages\.train \w+":
        TORCHRUN,  # both agents here
    r"dvc commit -f train-finetune": TORCHRUN,
    r"transferlab curve": CURVE,
    r"dvc plots show learning_curve": CURVE,
    r"from transferlab import Classifier": THREE_LINES,
    r"classifier = Classifier\.load\(.*\)": THREE_LINES,
    r"for p in classifier\.predict\(.*": THREE_LINES,
}
# README commands that no test runs -> the file that does (CI, or a benchmark run by hand), which must exist.
RUN_ELSEWHERE = {
    r"make test": ".ci/run",
    r"make bench": "benchmarks/speed.py",
    r"python benchmarks/\w+\.py.*": "benchmarks",  # their figures are in docs/
}
# Lines of the README's code blocks that are no command: messages it quotes, excerpts of outputs.
NOT_COMMANDS = (
    r"transferlab (train|STAGE): .*",
    r"\"most_confused\": .*",
    r"near-copies \(perceptual-hash distance .*",  # a line the split stage prints
)


def missing_tests(run_by: dict[str, str | tuple[str, ...]]) -> list[str]:
    """The node ids in `run_by` that name no test function defined in their file (a renamed or
    deleted test, a bare file), read with ast so that nothing is imported or run."""
    node_ids = [node_id for ids in run_by.values() for node_id in ((ids,) if isinstance(ids, str) else ids)]
    return [node_id for node_id in node_ids if not _defines(*node_id.partition("::")[::2])]


def _defines(file: str, name: str) -> bool:
    """Whether `file` defines test function `name` at its top level (a parametrized id: its function)."""
    path = ROOT / file
    if not name.startswith("test") or not path.is_file():
        return False
    functions = {node.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)}
    return name.split("[")[0] in functions


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
    patterns = [*RUN_BY, *RUN_ELSEWHERE, *NOT_COMMANDS]
    unaccounted = [c for c in readme_commands() if not any(re.fullmatch(p, c) for p in patterns)]
    assert not unaccounted, f"README commands no test or CI step runs: {unaccounted}"
    assert len(readme_commands()) > 20


def test_each_test_named_to_run_a_command_exists():
    assert not missing_tests(RUN_BY), "RUN_BY names tests that are not there (renamed? deleted?)"
    assert not [path for path in RUN_ELSEWHERE.values() if not (ROOT / path).exists()]


def test_a_renamed_or_deleted_test_is_reported_missing():
    run_by = {"a": "tests/test_readme.py::test_each_test_named_to_run_a_command_exists",
              "b": ("tests/test_readme.py::test_renamed_away", "tests/test_deleted.py::test_x", "tests/test_readme.py")}
    assert missing_tests(run_by) == list(run_by["b"])


def test_exp_show_only_changed_is_a_dvc_option():
    import subprocess
    import sys

    dvc = str(Path(sys.executable).parent / "dvc")
    usage = subprocess.run([dvc, "exp", "show", "--help"], capture_output=True, text=True).stdout
    assert "--only-changed" in usage


def anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(page: Path) -> list[str]:
    """The relative links of `page` (to a file, a file's heading, or a heading of its own) that lead
    nowhere; links to other sites are not followed."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, fragment = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(target)
        elif fragment and path.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", path.read_text(), flags=re.MULTILINE)
            if fragment not in {anchor(h) for h in headings}:
                broken.append(target)
    return broken


def test_the_readme_and_docs_link_to_pages_and_headings_that_exist():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert {page.name: broken_links(page) for page in pages} == {page.name: [] for page in pages}
