#!/usr/bin/env python3
"""Run the test suite on every CPython it finds and on a matrix of FastAPI/Starlette releases.

    python scripts/test_matrix.py              # everything, in sequence
    python scripts/test_matrix.py --list       # what would run
    python scripts/test_matrix.py --only py3.12 --only fastapi-0.137.0
    python scripts/test_matrix.py -- -k routes # extra pytest arguments after --

Each run gets its own venv under ``.venv-matrix/<name>`` with ``-e .[test,demo]`` installed
(reused while pyproject.toml and the run's pins are unchanged; pip's cache makes the first
install cheap). The interpreter runs use the newest releases pip resolves; the framework runs
use the interpreter running this script and leave out the files that test the interpreter,
not the framework (INTERPRETER_ONLY_FILES). A summary table goes to stdout; the exit status is
non-zero if any run fails, cannot be set up, or (with ``CI=true`` or ``--require-all``) an
interpreter is missing. Logs: ``.venv-matrix/logs/<name>.log``.

With ``--retries N`` a failing cell runs its failed tests again, up to N times; they stay
listed. Under ``CI=true`` the cells that repeat CI's own ``make test`` (its interpreter, the
newest FastAPI in a fresh venv) are skipped unless named with ``--only``.

Standard library only, so any Python 3.10+ can run it.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MATRIX = ROOT / ".venv-matrix"
LOGS = MATRIX / "logs"
PYTHONS = ("3.10", "3.11", "3.12", "3.13")

# Need a real Prometheus, the CLI's demo run, a pytester sub-suite, a real browser (the live
# page) or a start of each server (gunicorn, hypercorn, granian): not version sensitive enough
# to be worth their minutes in every cell. Everything else runs everywhere.
EXCLUDED_FILES = frozenset(
    {
        "test_e2e_prometheus.py",
        "test_grafana.py",
        "test_cli.py",
        "test_cli_profile.py",
        "test_docs.py",  # the docs and the wheel do not vary by interpreter or framework
        "test_package.py",
        "test_pytest_plugin.py",
        "test_server_startup.py",
        "test_starlette_suite.py",
        "test_ui.py",
    }
)
# Exercise the interpreter and loopwatch's own machinery (GIL and gc kinds, the profiler's
# sampling, worker processes, load), not the framework: the framework cells, which vary only
# FastAPI/Starlette on the interpreter `make test` already ran, leave them to the interpreter
# cells. What a framework release can change (routes, middleware, ownership, OpenTelemetry,
# the app's endpoints, accounting) runs in every cell.
INTERPRETER_ONLY_FILES = frozenset(
    {
        "test_kinds.py",
        "test_profile_shares.py",
        "test_profile.py",
        "test_workers.py",
        "test_fleet.py",
        "test_soak.py",
        "test_overload.py",
        "test_def_route_gc.py",
        "test_cputimer.py",
    }
)
_IMPORTS_FASTAPI = re.compile(r"^\s*(?:from|import)\s+(?:fastapi|demo_app)\b", re.MULTILINE)


@dataclass
class Run:
    """One cell of the matrix: an interpreter plus the requirements pinned on top."""

    name: str
    python: str | None  # interpreter path; None when not found
    pins: tuple[str, ...] = ()
    without_fastapi: bool = False  # plain Starlette: FastAPI's tests left out
    framework: bool = False  # a FastAPI/Starlette cell: INTERPRETER_ONLY_FILES left out
    same_as_clean_make_test: bool = False  # what `make test` installs in a fresh venv
    # pip commands run after the install: pins that conflict with the test extras (newer
    # httpx2 wants anyio 4.10) go here, where pip installs them with a warning, not a failure
    then: tuple[tuple[str, ...], ...] = ()
    note: str = ""
    # filled in when it runs
    versions: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    status: str = "pending"
    flaky: list[str] = field(default_factory=list)  # failed in an attempt before a retry


def framework_runs(default_python: str) -> list[Run]:
    runs = [
        Run("fastapi-0.100", default_python, note="oldest FastAPI the README claims, with "
            "the dependencies of its day (Starlette 0.27, uvicorn 0.23, httpx 0.24, anyio 3)",
            then=(("install", "fastapi==0.100.*", "uvicorn==0.23.*", "httpx==0.24.*",
                   "pydantic<2.4", "anyio<4", "websockets<12"),
                  # Litestar's newest needs a newer pydantic than this cell pins: its tests skip
                  ("uninstall", "-y", "httpx2", "httpcore2", "litestar"))),
        Run("fastapi-0.136.3", default_python, ("fastapi==0.136.3",),
            note="last release before _IncludedRouter"),
        Run("fastapi-0.137.0", default_python, ("fastapi==0.137.0",),
            note="first release with _IncludedRouter"),
        Run("fastapi-newest", default_python, ("--upgrade", "fastapi", "starlette"),
            note="newest FastAPI and the newest Starlette it allows",
            same_as_clean_make_test=True),
        Run("starlette-newest", default_python, without_fastapi=True,
            then=(("uninstall", "-y", "fastapi"), ("install", "--upgrade", "starlette")),
            note="plain Starlette, FastAPI not installed"),
    ]  # fmt: skip
    return [replace(run, framework=True) for run in runs]


def _version_of(python: str) -> str | None:
    """``"3.12"`` for a working interpreter, None for a broken one or a pyenv shim that
    points at a version not currently selected."""
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def find_interpreters() -> dict[str, str | None]:
    """``"3.10" -> path`` for each CPython found: pyenv's real binaries first (its shims fail
    for versions that are not selected), then ``python3.1x`` on PATH."""
    found: dict[str, str | None] = {}
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    for version in PYTHONS:
        candidates = sorted(
            glob.glob(str(pyenv_root / "versions" / f"{version}.*" / "bin" / "python")),
            key=lambda p: [int(x) if x.isdigit() else -1 for x in Path(p).parts[-3].split(".")],
            reverse=True,
        )  # fmt: skip
        on_path = shutil.which(f"python{version}")
        if on_path:
            candidates.append(on_path)
        found[version] = next((c for c in candidates if _version_of(c) == version), None)
    return found


def base_interpreter() -> str:
    """The interpreter running this script, outside any venv it may be running in."""
    return str(getattr(sys, "_base_executable", None) or sys.executable)


def _stamp(run: Run) -> str:
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    text = json.dumps([hashlib.sha256(pyproject).hexdigest(), run.python, run.pins,
                       run.then, run.without_fastapi])  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()


def _log(log: Path, *parts: str) -> None:
    with log.open("a") as f:
        f.write(" ".join(parts) + "\n")


def _sh(cmd: Sequence[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> int:
    """Run ``cmd`` in the repository with its output appended to ``log``; kill its whole
    process group (servers the tests started included) if it overruns."""
    _log(log, "$", *cmd)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(cmd), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )  # fmt: skip
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            _log(log, f"!! killed after {timeout:.0f}s")
            return -1
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise


def prepare(run: Run, log: Path, fresh: bool) -> Path | None:
    """Create or reuse the run's venv; returns its python, None if it could not be built."""
    assert run.python is not None
    venv = MATRIX / run.name
    python = venv / "bin" / "python"
    stamp_file = venv / ".matrix-stamp"
    stamp = _stamp(run)
    if fresh and venv.exists():
        shutil.rmtree(venv)
    if python.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        _log(log, f"reusing {venv}")
        return python
    if venv.exists():
        shutil.rmtree(venv)
    env = {"PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    steps: list[list[str]] = [
        [run.python, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", "-e", ".[test,demo]", *run.pins],
    ]
    steps += [[str(python), "-m", "pip", "-q", *step] for step in run.then]
    for step in steps:
        if _sh(step, log, timeout=900, env=env) != 0:
            return None
    stamp_file.write_text(stamp)
    return python


def installed_versions(python: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, platform\n"
        "out = {'python': platform.python_version()}\n"
        "for name in ('fastapi', 'starlette', 'uvicorn', 'uvloop'):\n"
        "    try: out[name] = m.version(name)\n"
        "    except m.PackageNotFoundError: out[name] = '-'\n"
        "print(json.dumps(out))"
    )
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    try:
        versions: dict[str, str] = json.loads(result.stdout)
    except ValueError:
        return {}
    return versions


def test_files(without_fastapi: bool, framework: bool = False) -> list[str]:
    """The test files a run collects; without FastAPI, those that import it (directly, or a
    helper module of ``tests/`` that does, e.g. an app served in a subprocess) are left out;
    in a framework cell, INTERPRETER_ONLY_FILES are."""
    tests = ROOT / "tests"
    helpers = [p.stem for p in tests.glob("*.py") if not p.name.startswith("test_")]
    needs_fastapi = [
        name for name in helpers
        if _IMPORTS_FASTAPI.search((tests / f"{name}.py").read_text(encoding="utf-8"))
    ]  # fmt: skip
    files = []
    for path in sorted(tests.rglob("test_*.py")):  # tests/<layer>/test_*.py
        if path.name in EXCLUDED_FILES or (framework and path.name in INTERPRETER_ONLY_FILES):
            continue
        text = path.read_text(encoding="utf-8")
        if without_fastapi and (
            _IMPORTS_FASTAPI.search(text) or any(f"tests.{n}" in text for n in needs_fastapi)
        ):
            continue
        files.append(str(path.relative_to(ROOT)))
    return files


def junit_counts(report: Path) -> dict[str, int]:
    """passed/failed/errors/skipped from pytest's JUnit XML."""
    root = ET.parse(report).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in total:
            total[key] += int(suite.get(key, 0))
    return {
        "passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
        "failed": total["failures"],
        "errors": total["errors"],
        "skipped": total["skipped"],
    }


def failed_tests(report: Path) -> list[str]:
    """Ids of the tests that failed or errored, from pytest's JUnit XML."""
    root = ET.parse(report).getroot()
    return [
        f"{case.get('classname', '')}::{case.get('name', '')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]


def node_id(test: str) -> str:
    """pytest's node id for a JUnit ``classname::name``: ``tests.servers.test_x.TestY::t[a]``
    is ``tests/servers/test_x.py::TestY::t[a]``."""
    classname, _, name = test.partition("::")
    parts = classname.split(".")
    for cut in range(len(parts), 0, -1):
        path = Path(*parts[:cut]).with_suffix(".py")
        if (ROOT / path).is_file():
            return "::".join([str(path), *parts[cut:], name])
    return test


def execute(
    run: Run, pytest_args: Sequence[str], fresh: bool, timeout: float, retries: int = 0
) -> None:
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"{run.name}.log"
    log.write_text("")
    started = time.monotonic()
    print(f"== {run.name}: {run.note or run.python}", flush=True)
    python = prepare(run, log, fresh)
    if python is None:
        run.status = "SETUP FAILED"
        run.seconds = time.monotonic() - started
        return
    run.versions = installed_versions(python)
    files = test_files(run.without_fastapi, run.framework)
    report = LOGS / f"{run.name}.xml"
    targets = files
    first: dict[str, int] = {}
    for attempt in range(retries + 1):
        report.unlink(missing_ok=True)
        code = _sh(
            [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
             *targets, *pytest_args],
            log, timeout=timeout,
        )  # fmt: skip
        run.seconds = time.monotonic() - started
        counts = junit_counts(report) if report.exists() else {}
        if attempt == 0 or not first:
            first = run.counts = counts
        elif counts:
            # a retry runs only what failed: the cell's counts are the first run's, with the
            # tests that now pass moved from failed to passed
            again = counts["failed"] + counts["errors"]
            fixed = first["failed"] + first["errors"] - again
            run.counts = {**first, "passed": first["passed"] + fixed, "failed": again,
                          "errors": 0}  # fmt: skip
        failed = run.counts.get("failed", 0) + run.counts.get("errors", 0)
        if code == 0 and run.counts and not failed:
            run.status = "ok" if attempt == 0 else f"ok on retry {attempt}"
            return
        if code == -1:
            run.status = "TIMEOUT"
            return
        run.status = "FAILED"
        # Timing tests on a noisy 2-core machine: a cell may run once more, and the tests
        # that failed before are kept in the table's notes, never hidden.
        flaky = failed_tests(report) if report.exists() else []
        run.flaky.extend(flaky)
        if attempt < retries:
            # the failed tests alone, not the whole cell: a cell is ~6 min of CI's 90
            targets = [node_id(test) for test in flaky] if flaky else files
            print(f"   failed: {', '.join(flaky) or 'see log'}; running again", flush=True)


def print_table(runs: Sequence[Run]) -> None:
    header = ("run", "python", "fastapi", "starlette", "passed", "failed", "errors",
              "skipped", "time", "status")  # fmt: skip
    rows: list[tuple[str, ...]] = [header]
    for r in runs:
        v, c = r.versions, r.counts
        rows.append((
            r.name, v.get("python", "-"), v.get("fastapi", "-"), v.get("starlette", "-"),
            *(str(c[k]) if k in c else "-" for k in ("passed", "failed", "errors", "skipped")),
            f"{r.seconds:.0f}s" if r.seconds else "-", r.status,
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print()
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for r in runs:
        if r.flaky and r.status.startswith("ok"):
            print(f"\n{r.name}: failed in an earlier attempt: {', '.join(r.flaky)}")
        if not r.status.startswith(("ok", "skipped")) and r.status != "missing":
            print(f"\n{r.name}: {r.status}, log: {LOGS / (r.name + '.log')}")
            tail = (LOGS / f"{r.name}.log").read_text(errors="replace").splitlines()[-25:]
            print("\n".join("    " + line for line in tail))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the runs and exit")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only these (repeatable), e.g. py3.12, fastapi-0.137.0",
    )
    parser.add_argument("--no-pythons", action="store_true", help="skip the interpreter runs")
    parser.add_argument("--no-frameworks", action="store_true", help="skip the framework runs")
    parser.add_argument("--fresh", action="store_true", help="rebuild the venvs")
    parser.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="per pytest run (default 900)",
    )
    parser.add_argument(
        "--require-all",
        action="store_true",
        help="fail if an interpreter is missing (default under CI=true)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=0,
        metavar="N",
        help="run a failing cell up to N more times (failures stay listed); default 0",
    )
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    args = parser.parse_args(argv)  # fmt: skip
    if args.retries < 0:
        parser.error(f"--retries={args.retries!r}: expected a whole number, 0 or more")
    if args.timeout <= 0:
        parser.error(f"--timeout={args.timeout!r}: expected a number of seconds above 0")

    runs: list[Run] = []
    if not args.no_pythons:
        # the interpreter of `make test`'s venv
        own = f"{sys.version_info[0]}.{sys.version_info[1]}"
        for version, path in find_interpreters().items():
            runs.append(Run(f"py{version}", path, note=path or "not found",
                            same_as_clean_make_test=version == own))  # fmt: skip
    if not args.no_frameworks:
        runs += framework_runs(base_interpreter())
    known = {r.name for r in runs}
    unknown = [name for name in args.only if name not in known]
    if unknown:
        parser.error(f"--only {', '.join(unknown)}: expected one of {', '.join(sorted(known))}")
    if args.only:
        runs = [r for r in runs if r.name in args.only]

    if args.list:
        for r in runs:
            then = "; ".join(" ".join(step) for step in r.then)
            print(f"{r.name:18} {r.python or 'not found':45} {' '.join(r.pins)} {then}  {r.note}")
        return 0

    in_ci = os.environ.get("CI", "").lower() == "true"
    require_all = args.require_all or in_ci
    started = time.monotonic()
    for run in runs:
        if run.python is None:
            run.status = "missing"
            continue
        if in_ci and run.same_as_clean_make_test and not args.only:
            # CI's clean clone has just run `make test` in a fresh venv: the same releases
            run.status = "skipped: make test ran it"
            print(f"== {run.name}: {run.status}", flush=True)
            continue
        execute(run, args.pytest_args, args.fresh, args.timeout, args.retries)
        print(f"   {run.status} {run.counts} in {run.seconds:.0f}s", flush=True)
    print_table(runs)
    print(f"\nmatrix finished in {time.monotonic() - started:.0f}s")
    passed = sum(r.counts.get("passed", 0) for r in runs)
    failed = sum(r.counts.get("failed", 0) + r.counts.get("errors", 0) for r in runs)
    print(f"matrix: {passed} passed, {failed} failed")  # the closing line CI reads
    bad = [r for r in runs if not r.status.startswith(("ok", "skipped")) and r.status != "missing"]
    missing = [r for r in runs if r.status == "missing"]
    if missing and require_all:
        print(f"missing interpreter(s): {', '.join(r.name for r in missing)} (required)")
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
