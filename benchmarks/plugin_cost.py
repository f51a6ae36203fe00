"""What the pytest plugin costs per test: trivial suites run without and with ``--loopwatch``.

``python -m benchmarks.plugin_cost [--tests 200 300] [--repeat 3] [--baseline REF]`` writes
each suite into a temporary directory and runs it with ``python -m pytest`` (in a subprocess,
the plugin loaded through its entry point as users get it), alternating the variants so a
busy machine hurts them alike. It prints pytest's own session time (best of the repeats),
the plugin's cost per test and the ratio to the bare run.

Suites: tests sharing a module-scoped Starlette ``TestClient`` (one portal loop in a thread for
the whole module), a function-scoped ``TestClient`` fixture (a portal loop per test), and
plain pytest-asyncio tests (a loop per test on pytest's thread).

``--baseline REF`` adds a column for the plugin as it was at git revision REF (its
``loopwatch/`` package is exported to a temporary directory and put first on ``PYTHONPATH``),
so a before/after comparison runs side by side on the same machine state.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

APP = """
from fastapi import FastAPI

from loopwatch import LoopWatchMiddleware

app = FastAPI()
app.add_middleware(LoopWatchMiddleware)


@app.get("/")
async def index():
    return {"ok": True}
"""

SUITES: dict[str, str] = {
    "module TestClient": """
import pytest
from starlette.testclient import TestClient

from app import app


@pytest.fixture(scope="module")
def client():
    with TestClient(app) as c:
        yield c


@pytest.mark.parametrize("n", range({n}))
def test_trivial(client, n):
    assert n >= 0
""",
    "function TestClient": """
import pytest
from starlette.testclient import TestClient

from app import app


@pytest.fixture
def client():
    with TestClient(app) as c:
        yield c


@pytest.mark.parametrize("n", range({n}))
def test_get(client, n):
    assert client.get("/").status_code == 200
""",
    "pytest-asyncio": """
import asyncio

import pytest


@pytest.mark.asyncio
@pytest.mark.parametrize("n", range({n}))
async def test_trivial(n):
    await asyncio.sleep(0)
""",
}

INI = """
[pytest]
asyncio_default_fixture_loop_scope = function
"""

_SESSION_TIME = re.compile(r" in (?P<seconds>[0-9.]+)s")


def _run(directory: Path, env: dict[str, str], args: list[str]) -> float:
    """pytest's session time for one run, in seconds."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    match = _SESSION_TIME.search(tail)
    if proc.returncode != 0 or match is None:
        sys.exit(f"pytest failed in {directory} with {args}:\n{proc.stdout}\n{proc.stderr}")
    return float(match["seconds"])


def export_loopwatch(ref: str, into: Path) -> Path:
    """The ``loopwatch`` package as of git revision ``ref``, unpacked under ``into``."""
    archive = subprocess.run(
        ["git", "archive", ref, "loopwatch"], cwd=ROOT, capture_output=True, check=True
    )
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plugin_cost", description=__doc__)
    parser.add_argument("--tests", type=int, nargs="+", default=[200, 300])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", metavar="REF", help="also time the plugin at git REF")
    parser.add_argument("--suite", choices=sorted(SUITES), action="append")
    args = parser.parse_args(argv)

    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH")}
    env.pop("PYTEST_ADDOPTS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    variants: dict[str, tuple[dict[str, str], list[str]]] = {
        "bare": (env, []),
        "plugin": (env, ["--loopwatch"]),
    }
    with tempfile.TemporaryDirectory(prefix="loopwatch-plugin-cost-") as tmp:
        if args.baseline:
            old = export_loopwatch(args.baseline, Path(tmp) / "baseline")
            old_env = {**env, "PYTHONPATH": os.pathsep.join([str(old), env["PYTHONPATH"]])}
            variants[f"plugin@{args.baseline}"] = (old_env, ["--loopwatch"])
        header = " | ".join(f"{name} s" for name in variants)
        extra = " | ".join(f"{name} ms/test | ratio" for name in variants if name != "bare")
        print(f"| suite | tests | {header} | {extra} |")
        print("|---|---:|" + "---:|" * (len(variants) + 2 * (len(variants) - 1)))
        for suite in args.suite or list(SUITES):
            for n in args.tests:
                directory = Path(tmp) / f"{suite.replace(' ', '-')}-{n}"
                directory.mkdir()
                (directory / "pytest.ini").write_text(INI)
                (directory / "app.py").write_text(textwrap.dedent(APP))
                (directory / "test_suite.py").write_text(SUITES[suite].replace("{n}", str(n)))
                best = {name: float("inf") for name in variants}
                for _ in range(args.repeat):
                    for name, (run_env, run_args) in variants.items():
                        best[name] = min(best[name], _run(directory, run_env, run_args))
                times = " | ".join(f"{best[name]:.2f}" for name in variants)
                costs = " | ".join(
                    f"{(best[name] - best['bare']) / n * 1000:.1f} | "
                    f"{best[name] / best['bare']:.2f}"
                    for name in variants
                    if name != "bare"
                )
                print(f"| {suite} | {n} | {times} | {costs} |", flush=True)


if __name__ == "__main__":
    main()
