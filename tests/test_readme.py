"""Every command the README shows is run as written by a test, or is listed here with the reason it
cannot be: this file fails when the README shows a command in neither table, when a table names a
command the README no longer shows, or a test that is not there (renamed? deleted?)."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = "tests/test_readme_commands.py::"
MADE = COMMANDS + "test_make_repro_runs_the_pipeline_and_dvc_reads_it_back"
EXPERIMENTS = COMMANDS + "test_experiments_rerun_what_depends_on_their_keys"
PYTHON = COMMANDS + "test_the_classifier_lines_predict_and_export"
SHARING = COMMANDS + "test_sharing_through_s3_and_git"
MIRROR = COMMANDS + "test_offline_from_a_mirror_then_a_queued_sweep_is_ranked"
CURVE = COMMANDS + "test_a_learning_curve_runs_and_is_drawn"
ACTIVATE = COMMANDS + "test_activate_or_export_puts_the_venv_first"

# A README command, exactly as it stands there -> the test that runs exactly that string (through
# bash, or the Python lines through python), which must define it as a literal.
RUN_VERBATIM = {
    "make repro": MADE,
    "dvc repro": MADE,
    "dvc metrics show": MADE,
    "dvc metrics diff": MADE,
    "dvc metrics diff main other-branch": MADE,
    "dvc plots diff main other-branch": MADE,
    "dvc plots show": MADE,
    "transferlab compare main other-branch": MADE,
    "source .venv/bin/activate": ACTIVATE,
    'export PATH="$PWD/.venv/bin:$PATH"': ACTIVATE,
    "dvc exp run -S model=resnet": EXPERIMENTS,
    "dvc exp run -S scratch.lr=0.01 -S scratch.epochs=60": EXPERIMENTS,
    "dvc exp run -S ++scratch.gamma=0.5": EXPERIMENTS,
    "dvc exp show --only-changed": EXPERIMENTS,
    "dvc exp run -n fine-tune -S finetune.head_epochs=1 -S finetune.backbone_lr_factor=0.1 -S finetune.scheduler=onecycle":
        EXPERIMENTS,
    "transferlab compare HEAD fine-tune": EXPERIMENTS,
    "from transferlab import Classifier": PYTHON,
    'classifier = Classifier.load("models/finetune.pt")': PYTHON,
    'for p in classifier.predict(["bee.jpg", "photos/"]): print(p.path, p.label, p.confidence)': PYTHON,
    "transferlab predict models/finetune.pt photos/ 'more/*.jpg' --top-k 3 --csv predictions.csv --grid predictions.png":
        PYTHON,
    "transferlab export models/finetune.pt --out finetune.onnx": PYTHON,
    "transferlab curve": CURVE,
    "dvc plots show learning_curve": CURVE,
    "dvc remote add -d storage s3://my-bucket/transferlab": SHARING,  # moto's S3 server on loopback
    'git commit -m "the DVC remote" .dvc/config': SHARING,
    "dvc push": SHARING,
    "git push": SHARING,
    "dvc pull": SHARING,
    "dvc exp push origin --rev HEAD": SHARING,
    "dvc exp pull origin --rev HEAD": SHARING,
    "TRANSFERLAB_DATA_MIRROR=../shared/data dvc exp run -S model=efficientnet_lite0": MIRROR,
    "dvc exp run --queue -S model=efficientnet_lite0,efficientnet_lite1,efficientnet_lite2 -S seed=1,2,3": MIRROR,
    "dvc queue start -j 1": MIRROR,
    "dvc queue status": MIRROR,
    "transferlab compare": MIRROR,
}
# README commands no test runs as written -> why not, and what runs them otherwise.
NOT_RUN = {
    "python benchmarks/results.py": "the main run: the whole pipeline on the real dataset, about 9 minutes on 2 "
                                    "cores; tests/test_results.py checks the text against what it wrote",
    "make test": "the whole suite, this test among it: CI runs it (.ci/run)",
    "make install": "creates .venv and pip-installs the project from PyPI (network, ~6 GB); "
                    "`make repro` is run with this venv installed, so it skips this step",
    "python benchmarks/gpu.py --archive ../shared/data/hymenoptera_data.zip":
        "needs a CUDA GPU and the real dataset; the suite runs on CPU (tests/test_gpu_paths.py tests the paths)",
    "dvc exp run -S data.url=/path/to/folder":
        "/path/to/folder stands for the user's folder; every tiny project runs with data.url set to a folder "
        "(tests/conftest.py::tiny_project)",
}


def readme_commands(text: str) -> list[str]:
    """The README's commands, in order, each once: every line of its code blocks (indented 4, or
    fenced), comments cut off, not the pipeline diagram; and every inline code span that is a shell
    command (a tool's name and a space, or an environment variable set)."""
    commands, prose, fenced = [], [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced or re.match(r" {4}\S", line):
            command = re.split(r"\s+#\s", line.strip())[0].strip()
            if command and "──" not in command:
                commands.append(command)
        else:
            prose.append(line)
    spans = re.findall(r"`([^`]+)`", re.sub(r"<!--.*?-->", "", "\n".join(prose), flags=re.DOTALL))
    for span in (" ".join(span.split()) for span in spans):  # a span may wrap onto the next line
        if re.match(r"(dvc|transferlab|make|python|git|source|export|torchrun) |[A-Z][A-Z0-9_]*=", span):
            commands.append(span)
    return list(dict.fromkeys(commands))


def missing_tests(run_by: dict[str, str]) -> list[str]:
    """The node ids in `run_by` that name no test function defined in their file (a renamed or
    deleted test, a bare file), or one whose file does not hold the command as written; read with
    ast, so that nothing is imported or run."""
    return [node_id for command, node_id in run_by.items() if not _runs(command, *node_id.partition("::")[::2])]


def _runs(command: str, file: str, name: str) -> bool:
    """Whether `file` defines test function `name` at its top level (a parametrized id: its
    function) and holds `command` as one string literal (adjacent literals, as a long line splits,
    are one) in that function or in a top-level function it names: a fixture it takes, a helper it
    calls. Not anywhere else in the file: another test's run of the command does not count."""
    path = ROOT / file
    if not name.startswith("test") or not path.is_file():
        return False
    functions = {node.name: node for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)}
    test = functions.get(name.split("[")[0])
    if test is None:
        return False
    named = {arg.arg for arg in test.args.args} | {node.id for node in ast.walk(test) if isinstance(node, ast.Name)}
    bodies = [test, *(functions[n] for n in named & functions.keys())]
    return any(isinstance(node, ast.Constant) and node.value == command for body in bodies for node in ast.walk(body))


def test_every_readme_command_is_run_as_written_or_says_why_not():
    commands = readme_commands((ROOT / "README.md").read_text())
    assert len(commands) > 30
    assert not set(RUN_VERBATIM) & set(NOT_RUN)
    assert [c for c in commands if c not in RUN_VERBATIM and c not in NOT_RUN] == [], \
        "README commands that no test runs as written, and no reason why not"
    assert [c for c in (*RUN_VERBATIM, *NOT_RUN) if c not in commands] == [], "commands the README no longer shows"


def test_each_test_named_to_run_a_command_exists_and_holds_it():
    assert missing_tests(RUN_VERBATIM) == [], "tests that are not there (renamed? deleted?) or no longer run it"


def test_a_renamed_or_deleted_test_is_reported_missing():
    this = "tests/test_readme.py::"
    run_by = {"dvc push": this + "test_a_renamed_or_deleted_test_is_reported_missing",
              "make test": this + "test_renamed_away", "git push": "tests/test_deleted.py::test_x",
              "dvc pull": "tests/test_readme.py",
              "dvc" + " gc": this + "test_each_test_named_to_run_a_command_exists_and_holds_it",  # not a literal here
              "make install": this + "test_commands_are_read_from_blocks_and_inline_code"}  # in another test
    assert missing_tests(run_by) == list(run_by.values())[1:]


def test_commands_are_read_from_blocks_and_inline_code():
    text = ("Run `dvc repro`, or `dvc\nexp show`; not `params.yaml`, `dvc`, `TRANSFERLAB_DATA_MIRROR`.\n\n"
            "    make repro   # all of it\n    ├───► train\n\n```\nX=1 dvc pull\n```\n"
            "<!-- numbers: `dvc metrics show` -->\n    make repro\n")
    assert readme_commands(text) == ["make repro", "X=1 dvc pull", "dvc repro", "dvc exp show"]


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
