"""The command line: ``loopwatch demo`` runs the article's benchmark against the demo app and
prints loopwatch's diagnosis beside it; ``loopwatch report URL`` prints the same diagnosis for
any app's ``/metrics`` (or a saved exposition file); ``loopwatch profile URL`` prints where the
loop time goes per route and line, from the app's loop profile, and writes a flame graph;
``loopwatch run -- COMMAND`` runs a server with loopwatch in its app, no code change.

Nothing in the package imports this one. It needs only the standard library and
prometheus_client; rich (colour, tables, a progress bar) is used when installed, and without a
terminal the output is plain text. The demo app needs fastapi and uvicorn
(``pip install 'loopwatch[demo]'``); the load generator is plain asyncio streams.

One module per command: it defines ``add_parser(commands)``, which adds its subparser and sets
``run`` (``run(args, out) -> exit status``) as the subparser's default. A new command is such a
module plus its entry in ``COMMANDS``. Shared pieces: ``output`` (tables, lines, progress),
``scrape`` (reading an exposition and the stall ring), ``diagnosis`` (per-route diagnosis and fix
hints), ``arguments`` (option value parsers), ``errors`` (``CliError``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Protocol

from loopwatch.cli import demo, profile, report, run
from loopwatch.cli.errors import PROG, CliError
from loopwatch.cli.output import Output

__all__ = ["main"]


class Command(Protocol):
    """A command module."""

    def add_parser(self, commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        """Add the command's subparser, with ``run`` as its default."""


# In the order ``--help`` lists them.
COMMANDS: tuple[Command, ...] = (run, demo, report, profile)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Find the code that freezes an asyncio web server."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Output(plain=args.plain)
    try:
        return int(args.run(args, out))
    except CliError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
