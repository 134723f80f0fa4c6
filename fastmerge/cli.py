"""Command-line interface: ``fastmerge <command> ...`` (also ``python -m fastmerge``).

Each command is one entry in ``COMMANDS``: a function that fills its argparse sub-parser and one
that runs it with the parsed arguments and returns the exit status. Heavy imports happen inside the
run functions, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NamedTuple, Optional, Sequence


class Command(NamedTuple):
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ------------------------------------------------------------------------------------ bench

def _bench_arguments(p: argparse.ArgumentParser) -> None:
    from fastmerge.benchmarks import runner

    runner.add_arguments(p)


def _bench_run(args: argparse.Namespace) -> int:
    from fastmerge.benchmarks import runner

    return runner.run(args)


COMMANDS: dict[str, Command] = {
    "bench": Command(
        help="benchmark the fused ops against the reference and the memory bandwidth",
        description=(
            "Time every op (average, task arithmetic, TIES global and per-tensor, cosine, block_scale "
            "forward/backward) on every CPU backend over a size sweep up to the size of open_clip "
            "ViT-B-32's visual tower (T = 8 synthetic task vectors), and report effective GB/s, the "
            "share of the memory bandwidth measured in the same run, the speedup over the reference, "
            "and the peak extra memory of each case measured in a fresh process. The table goes to "
            "stdout, progress to stderr."
        ),
        add_arguments=_bench_arguments,
        run=_bench_run,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    from fastmerge import __version__

    parser = argparse.ArgumentParser(prog="fastmerge", description="fastmerge: fused task-vector model merging.")
    parser.add_argument("--version", action="version", version=f"fastmerge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.description)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
