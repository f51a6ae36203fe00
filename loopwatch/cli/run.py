"""``loopwatch run [options] -- COMMAND ARGS...``: COMMAND with loopwatch in every ASGI app it
serves, and no change to the app's code.

The options become ``LOOPWATCH_*`` variables, checked here first, so a bad value fails before
anything starts. The directory of loopwatch's bootstrap ``sitecustomize`` goes first on
``PYTHONPATH``, and COMMAND replaces this process (``exec``, as ``opentelemetry-instrument``
does: signals, the exit status and the process id stay the server's). Every Python process
COMMAND starts imports the bootstrap, which wraps the app its server loads
(``loopwatch.attach``). The app has no metrics mount, so the metrics go to a side port
(``--metrics-port``, 9100 unless set).

A server may start several workers, and only one can bind the side port: unless
``PROMETHEUS_MULTIPROC_DIR`` is set, the runner sets it to a directory of its own,
``loopwatch-run-<pid>`` in the temporary directory (the pid is the server's: exec keeps it), so
the worker that binds the port serves every worker's figures. Nothing is left to remove it when
the server exits: each run removes those of servers no longer running.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from loopwatch.cli.errors import CliError
from loopwatch.cli.output import Output
from loopwatch.config import (
    BOOLEAN_OPTIONS,
    ENV_VARIABLES,
    ConfigError,
    Settings,
    multiprocess_dir,
    option_help,
)
from loopwatch.fleet import alive

__all__ = ["BOOTSTRAP", "DEFAULT_METRICS_PORT", "add_parser", "command_environment"]

DEFAULT_METRICS_PORT = 9100
# the directory holding the bootstrap ``sitecustomize.py``
BOOTSTRAP = Path(__file__).resolve().parent.parent / "bootstrap"

EXAMPLES = """\
examples:
  loopwatch run -- uvicorn app:app --port 8000
  loopwatch run --threshold 0.2 --metrics-port 9200 -- uvicorn app:app
  loopwatch run -- python service.py            # a script that calls uvicorn.run(app)
  loopwatch run -- gunicorn -k uvicorn_worker.UvicornWorker app:app
  loopwatch run -- hypercorn app:app --workers 4
  loopwatch run -- granian --interface asgi app:app
  loopwatch run -- python aiohttp_service.py    # web.run_app(app)
  LOOPWATCH_THRESHOLD=0.05 loopwatch run -- uvicorn app:app

Then: curl localhost:9100/metrics, open http://localhost:9100/, or
loopwatch report localhost:9100.
"""


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def command_environment(args: argparse.Namespace, env: dict[str, str]) -> dict[str, str]:
    """The environment COMMAND runs in: ``env`` with the options' variables and the
    bootstrap first on ``PYTHONPATH``. Raises ``CliError`` for a bad option, naming it."""
    env = dict(env)
    flags: dict[str, str] = {}  # variable -> the flag it came from
    for option, variable in ENV_VARIABLES.items():
        value = getattr(args, option, None)
        if value is None:
            continue
        env[variable] = ("on" if value else "off") if isinstance(value, bool) else str(value)
        flags[variable] = _flag(option)
    env.setdefault(ENV_VARIABLES["metrics_port"], str(DEFAULT_METRICS_PORT))
    try:
        Settings.resolve(env=env)
    except ConfigError as error:
        variable = ENV_VARIABLES.get(error.option, "")
        if variable in flags:
            raise CliError(
                f"invalid {flags[variable]} {error.value!r}: expected {error.expected}"
            ) from None
        raise CliError(str(error).removeprefix("loopwatch: ")) from None
    if not multiprocess_dir(env):
        env["PROMETHEUS_MULTIPROC_DIR"] = str(_fresh_run_dir())
    paths = [str(BOOTSTRAP), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


_RUN_DIR = "loopwatch-run-"


def _fresh_run_dir() -> Path:
    """A fresh ``loopwatch-run-<this pid>``, after removing those of servers that are gone."""
    tmp = Path(tempfile.gettempdir())
    for old in tmp.glob(_RUN_DIR + "*"):
        pid = old.name.removeprefix(_RUN_DIR)
        with contextlib.suppress(OSError):
            if pid.isdigit() and not alive(int(pid)) and old.stat().st_uid == os.getuid():
                shutil.rmtree(old, ignore_errors=True)
    path = tmp / f"{_RUN_DIR}{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)  # a dead server's, whose pid this process got
    path.mkdir(mode=0o700)
    return path


def run_command(args: argparse.Namespace, out: Output) -> int:
    command = list(args.program)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise CliError("no COMMAND given: loopwatch run [options] -- COMMAND ARGS... "
                       "(for example: loopwatch run -- uvicorn app:app)")  # fmt: skip
    env = command_environment(args, dict(os.environ))
    executable = shutil.which(command[0], path=env.get("PATH"))
    if executable is None:
        raise CliError(f"COMMAND {command[0]!r}: not found, or not executable, on PATH")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(executable, command, env)
    except OSError as error:
        raise CliError(f"COMMAND {command[0]!r}: cannot run it: {error.strerror}") from None
    return 0  # not reached: COMMAND has replaced this process


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = commands.add_parser(
        "run",
        help="run a server or script with loopwatch in every ASGI app it serves, no code change",
        description="Run COMMAND with loopwatch's middleware in every ASGI app it serves "
        "(uvicorn, also with --workers, uvicorn.run() in a script, gunicorn's uvicorn "
        "workers, hypercorn, granian --interface asgi), and in every aiohttp web.Application "
        "an AppRunner serves (web.run_app). Options are the middleware's, as flags or LOOPWATCH_* variables; a flag "
        "wins. The metrics are served on a side port.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for option, variable in ENV_VARIABLES.items():
        if option in BOOLEAN_OPTIONS:
            run.add_argument(
                _flag(option), action=argparse.BooleanOptionalAction, default=None,
                help=f"(or {variable})",
            )  # fmt: skip
        else:
            default = f", default {DEFAULT_METRICS_PORT}" if option == "metrics_port" else ""
            run.add_argument(
                _flag(option), metavar="VALUE", default=None,
                help=f"{option_help(option)} (or {variable}{default})",
            )  # fmt: skip
    run.add_argument(
        "program", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS...",
        help="what to run: a server (uvicorn, gunicorn) or python and a script",
    )  # fmt: skip
    run.set_defaults(run=run_command, plain=True)
