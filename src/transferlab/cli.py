"""The `transferlab` console script: one verb per job, each a thin layer over library functions.

    transferlab cache [--prune DAYS]      # what the cache holds; delete what was unused for DAYS
    transferlab compare                   # every experiment of this baseline -> leaderboard.{md,json,png}
    transferlab compare main my-exp       # does my-exp beat main, by how much, and how sure?
    transferlab curve                     # the learning curve: curves/params.yaml's points, then its summary
    transferlab predict models/finetune.pt photos/ --csv out.csv --grid out.png
    transferlab export models/finetune.pt --out model.onnx
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transferlab.errors import UserError


def cache(args: argparse.Namespace) -> int:
    """What the cache folder holds (decoded images, embeddings, ...), and pruning it."""
    from transferlab.caches import describe, entries, prune
    from transferlab.stages import cache_dir

    folder = cache_dir()
    if args.prune is not None:
        removed = prune(folder, args.prune)
        print(f"removed {len(removed)} entries, {sum(e.bytes for e in removed) / 1e6:.1f} MB, from {folder}")
    print(f"{folder}:\n{describe(entries(folder))}")
    return 0


def compare(args: argparse.Namespace) -> int:
    """Rank experiments (all of the current baseline's, or the revisions and experiment names given)
    on the same test images: one row per model, mode and differing params, seeds pooled; a paired
    test against the best. With two revisions, also: does the second beat the first?"""
    from transferlab.compare import (
        baseline_runs,
        head_to_head,
        leaderboard,
        markdown,
        read_run,
        resolve,
        write_leaderboard,
    )
    from transferlab.errors import warn

    cwd = Path.cwd()
    pairs = [(rev, resolve(rev, cwd)) for rev in args.revs] if args.revs else baseline_runs(cwd)
    runs = []
    for label, rev in pairs:
        run = read_run(label, rev, cwd)
        if run is None:
            warn(f"{label} ({rev[:7]}) has no evaluated results in git (metrics/eval.json); left out")
        else:
            runs.append(run)
    rows = leaderboard(runs)
    paths = write_leaderboard(rows, Path(args.out))
    print(markdown(rows))
    if len(args.revs) == 2 and len(runs) == 2:
        a, b = runs
        print(f"{b.label} against {a.label}, on the same {len(a.test_images)} test images:")
        for mode in head_to_head(a, b):
            print(f"  {mode['mode']}: {mode['accuracy_a']:.3f} -> {mode['accuracy_b']:.3f} "
                  f"({mode['gain']:+.3f}; right only in {a.label}: {mode['only_a_right']}, only in {b.label}: "
                  f"{mode['only_b_right']}): {mode['verdict']} (paired test p = {mode['p_value']:.3g})")
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


CURVE_PIPELINE, CURVE_DVC_YAML = Path("curves/pipeline.yaml"), Path("curves/dvc.yaml")


def curve(args: argparse.Namespace) -> int:
    """Run the learning curve: every point curves/params.yaml lists that has not run yet, then
    its summary (`dvc repro curves/dvc.yaml`, with any further arguments given to it).

    The curve's stages are written to curves/dvc.yaml (from curves/pipeline.yaml) only now: DVC
    reads every dvc.yaml in a project, so one there from the start would make a plain `dvc status`
    or `dvc plots show` after `dvc repro` report a curve nobody asked for."""
    import subprocess

    if not CURVE_PIPELINE.exists():
        raise UserError(f"{CURVE_PIPELINE} is missing: run transferlab curve from the project's root folder")
    pipeline = CURVE_PIPELINE.read_text()
    if not CURVE_DVC_YAML.exists() or CURVE_DVC_YAML.read_text() != pipeline:
        print(f"writing {CURVE_DVC_YAML} from {CURVE_PIPELINE}", file=sys.stderr)
        from transferlab.files import atomic_writer

        with atomic_writer(CURVE_DVC_YAML) as f:
            f.write(pipeline)
    # This interpreter's dvc: the one installed beside transferlab, whatever PATH holds.
    return subprocess.run([sys.executable, "-m", "dvc", "repro", str(CURVE_DVC_YAML), *args.dvc_args]).returncode


def predict(args: argparse.Namespace) -> int:
    """Classify images (files, folders, globs) with a trained checkpoint: class, confidence and
    top-k per image, preprocessed exactly as evaluate does; unreadable images are reported."""
    import csv
    import json

    from transferlab.files import atomic_writer
    from transferlab.predict import Classifier

    classifier = Classifier.load(args.checkpoint, args.device)
    results = classifier.predict(args.images, args.top_k, args.batch_size)
    if not results:
        raise UserError(f"no images found in {' '.join(args.images)}")
    width = max(len(r.path) for r in results)
    for r in results:
        top = ", ".join(f"{label} {p:.2f}" for label, p in r.top)
        print(f"{r.path:<{width}}  {r.label} {r.confidence:.3f}  ({top})" if r.error is None
              else f"{r.path:<{width}}  skipped: {r.error}")
    rows = [{"path": r.path, "label": r.label, "confidence": r.confidence,
             "top": [{"label": label, "probability": p} for label, p in r.top], "error": r.error} for r in results]
    if args.json:
        with atomic_writer(args.json) as f:
            json.dump(rows, f, indent=2)
    if args.csv:
        with atomic_writer(args.csv, newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", "confidence", "top", "error"])
            for r in results:
                writer.writerow([r.path, r.label or "", "" if r.confidence is None else f"{r.confidence:.4f}",
                                 " ".join(f"{label}:{p:.4f}" for label, p in r.top), r.error or ""])
    if args.grid:
        from transferlab.figures import plot_predictions

        plot_predictions([r for r in results if r.error is None], args.grid, Path(args.checkpoint).name)
    skipped = sum(r.error is not None for r in results)
    print(f"{len(results) - skipped} images classified{f', {skipped} skipped' if skipped else ''}", file=sys.stderr)
    return 0


def export(args: argparse.Namespace) -> int:
    """Write a checkpoint as ONNX (classes and preprocessing in its metadata), then check it with
    onnxruntime against PyTorch's outputs."""
    from transferlab.export import export_onnx, validate_onnx

    out = export_onnx(args.checkpoint, args.out)
    error = validate_onnx(args.checkpoint, out)
    print(f"wrote {out}; onnxruntime matches PyTorch within {error:.1e} of the logits' scale")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transferlab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    caches = verbs.add_parser("cache", help="what the cache holds; prune it",
                              description=cache.__doc__ + "\n\nexample: transferlab cache --prune 30",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    caches.add_argument("--prune", type=float, metavar="DAYS",
                        help="delete entries not used for DAYS days (0: everything); all are rebuilt when needed")
    caches.set_defaults(run=cache)
    ranking = verbs.add_parser("compare", help="rank experiments on the same test images, with paired tests",
                               description=compare.__doc__ + "\n\nexamples:\n  transferlab compare\n"
                               "  transferlab compare main other-branch",
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    ranking.add_argument("revs", nargs="*", help="git revisions or experiment names (default: every experiment "
                                                  "of the current baseline, as dvc exp show lists them)")
    ranking.add_argument("--out", default=".", help="folder for leaderboard.md/.json/.png (default: here)")
    ranking.set_defaults(run=compare)
    curving = verbs.add_parser("curve", help="run the learning curve (dvc repro curves/dvc.yaml)",
                               description=curve.__doc__ + "\n\nexamples:\n  transferlab curve\n"
                               "  transferlab curve --dry", formatter_class=argparse.RawDescriptionHelpFormatter)
    curving.add_argument("dvc_args", nargs=argparse.REMAINDER, help="passed on to dvc repro")
    curving.set_defaults(run=curve)
    classify = verbs.add_parser("predict", help="classify images with a trained checkpoint",
                                description=predict.__doc__ + "\n\nexample: transferlab predict models/finetune.pt "
                                "photos/ 'more/*.jpg' --csv predictions.csv --grid predictions.png",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    classify.add_argument("checkpoint", help="models/MODE.pt, as the train stage writes it")
    classify.add_argument("images", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    classify.add_argument("--top-k", type=int, default=3)
    classify.add_argument("--batch-size", type=int, default=16)
    classify.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps")
    classify.add_argument("--csv", help="also write the predictions as CSV")
    classify.add_argument("--json", help="also write the predictions as JSON")
    classify.add_argument("--grid", help="also draw the images with their predicted labels (PNG)")
    classify.set_defaults(run=predict)
    exporting = verbs.add_parser("export", help="write a checkpoint as ONNX and check it against PyTorch",
                                 description=export.__doc__ + "\n\nexample: transferlab export models/finetune.pt "
                                 "--out finetune.onnx", formatter_class=argparse.RawDescriptionHelpFormatter)
    exporting.add_argument("checkpoint")
    exporting.add_argument("--out", required=True, help="the .onnx file to write")
    exporting.set_defaults(run=export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "curve":  # only `curve` passes options on (to dvc repro)
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "curve":
        args.dvc_args = [*args.dvc_args, *extra]
    try:
        return args.run(args)
    except UserError as err:
        print(f"transferlab {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
