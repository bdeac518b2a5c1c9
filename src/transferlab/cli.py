"""The `transferlab` console script: one verb per job, each a thin layer over library functions.

    transferlab plots show                # dvc plots show, drawn without network
    transferlab plots diff main other     # dvc plots diff, likewise
"""
from __future__ import annotations

import argparse
import subprocess
import sys

from transferlab.errors import UserError


def plots(args: argparse.Namespace) -> int:
    """`dvc plots show|diff ...` with Vega inlined in the page, so that it draws offline."""
    from transferlab.stages import cache_dir
    from transferlab.vega import offline_template

    template = offline_template(cache_dir())
    return subprocess.call(["dvc", "plots", args.verb, "--html-template", str(template), *args.dvc_args])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transferlab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plot = verbs.add_parser("plots", help="dvc plots show/diff, drawn without network",
                            description=plots.__doc__ + "\n\nexample: transferlab plots diff main other-branch",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    plot.add_argument("verb", choices=["show", "diff"])
    plot.add_argument("dvc_args", nargs=argparse.REMAINDER, help="passed on to dvc plots (revisions, -o, ...)")
    plot.set_defaults(run=plots)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as err:
        print(f"transferlab {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
