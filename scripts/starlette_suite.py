#!/usr/bin/env python3
"""Run Starlette's own test suite bare and with every app wrapped in ``LoopWatchMiddleware``,
and fail if a test fails wrapped that passes bare.

    python scripts/starlette_suite.py                  # the Starlette installed in this venv
    python scripts/starlette_suite.py --starlette 1.9.0
    python scripts/starlette_suite.py -- -k routing    # extra pytest arguments after --

The sdist of that Starlette version is downloaded once into ``.venv-starlette/src/`` and its
tests run from there, against its own source. ``.venv-starlette`` is a venv of its own (so
the main test venv is unchanged) holding loopwatch (editable) and what the suite needs:
Starlette's dependencies, its ``full`` extra and its ``dev`` dependency group without the
tooling (linters, type checkers, coverage, benchmarks). That includes trio, so every test
that takes ``anyio_backend`` runs on asyncio and trio, and blockbuster, which Starlette's
conftest then activates around every test (``scripts/starlette_wrap.py`` refuses to run if
it is off).

Both runs use the same command, seed and order; they differ in ``--loopwatch-wrap`` only,
which makes ``scripts/starlette_wrap.py`` wrap each app handed to ``TestClient`` or
``httpx.ASGITransport``. Per-test outcomes come from pytest's JUnit XML. Exit status 1 if any
test fails (or errors) wrapped but not bare, or a run produced no report.

Standard library only (plus ``tomllib``: Python 3.11+, as Starlette's suite needs anyway).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-starlette"
SRC = VENV / "src"
REPORTS = VENV / "reports"

# Development tools in Starlette's ``dev`` group that its tests do not import.
TOOLING = frozenset({"coverage", "mypy", "pytest-codspeed", "ruff", "twine"})
# The same order and hashing in both runs; plugins that would reorder or add checks are off
# (loopwatch's own pytest plugin is not what this compares).
PYTEST_ARGS = ("-p", "no:cacheprovider", "-p", "no:randomly", "-p", "no:loopwatch",
               "-p", "starlette_wrap", "-q", "--tb=native", "-o", "junit_logging=no")  # fmt: skip
ENV = {"PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_LOOPWATCH_FRAME = re.compile(r'File "[^"]*?(loopwatch/[\w/]+\.py)", line (\d+), in (\w+)')


@dataclass
class Outcome:
    nodeid: str
    backend: str
    outcome: str  # passed, failed, error, skipped
    message: str = ""
    where: str = ""  # the innermost loopwatch frame of the traceback, if any
    blockbuster: str = ""
    apps_wrapped: int = 0


@dataclass
class RunResult:
    name: str
    seconds: float
    returncode: int
    outcomes: dict[str, Outcome] = field(default_factory=dict)


def log(*parts: object) -> None:
    print(*parts, flush=True)


def sh(cmd: Sequence[str], cwd: Path, logfile: Path, timeout: float) -> int:
    """Run ``cmd`` with its output appended to ``logfile``; kill its whole process group if
    it overruns."""
    with logfile.open("ab") as out:
        out.write(("$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPWATCH_")}
        env.update(ENV)
        env["PYTHONPATH"] = str(ROOT / "scripts")
        proc = subprocess.Popen(
            list(cmd), cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )  # fmt: skip
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out.write(f"!! killed after {timeout:.0f}s\n".encode())
            return -1
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise


def base_interpreter() -> str:
    """The interpreter running this script, outside any venv it may be running in."""
    return str(getattr(sys, "_base_executable", None) or sys.executable)


def fetch_sdist(version: str, logfile: Path) -> Path:
    """Download (once) and unpack (once) Starlette's sdist; returns the source tree."""
    tree = SRC / f"starlette-{version}"
    if (tree / "tests" / "conftest.py").exists():
        return tree
    SRC.mkdir(parents=True, exist_ok=True)
    archive = SRC / f"starlette-{version}.tar.gz"
    if not archive.exists():
        log(f"downloading the sdist of starlette=={version}")
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:",
               "--no-deps", f"starlette=={version}", "-d", str(SRC)]  # fmt: skip
        if sh(cmd, ROOT, logfile, timeout=600) != 0 or not archive.exists():
            raise SystemExit(f"could not download starlette=={version}, see {logfile}")
    with tarfile.open(archive) as tar:
        tar.extractall(SRC, filter="data")
    if not (tree / "tests" / "conftest.py").exists():
        raise SystemExit(f"{archive} holds no tests/conftest.py: cannot run Starlette's suite")
    return tree


def _name(requirement: str) -> str:
    match = _NAME.match(requirement)
    return match.group(1).lower().replace("_", "-") if match else ""


def test_requirements(tree: Path) -> list[str]:
    """Starlette's dependencies, its ``full`` extra and its ``dev`` group, minus tooling and
    minus Starlette itself (the tests import it from the source tree)."""
    if sys.version_info < (3, 11):
        raise SystemExit("reading Starlette's pyproject.toml needs Python 3.11+ (tomllib)")
    import tomllib  # type: ignore[import-not-found,unused-ignore]  # 3.11+, checked above

    data = tomllib.loads((tree / "pyproject.toml").read_text(encoding="utf-8"))
    project = data.get("project", {})
    groups: dict[str, list[object]] = data.get("dependency-groups", {})

    def group(name: str) -> Iterable[str]:
        for entry in groups.get(name, []):
            if isinstance(entry, str):
                yield entry
            elif isinstance(entry, dict) and "include-group" in entry:
                yield from group(str(entry["include-group"]))

    wanted = [*project.get("dependencies", []), *project.get("optional-dependencies", {})
              .get("full", []), *group("dev")]  # fmt: skip
    out: list[str] = []
    for requirement in wanted:
        name = _name(requirement)
        if name in TOOLING or name.startswith("types-") or name == "starlette":
            continue
        if requirement not in out:
            out.append(requirement)
    return out


def prepare_venv(tree: Path, requirements: list[str], logfile: Path, fresh: bool) -> Path:
    """Create or reuse ``.venv-starlette``; returns its python."""
    python = VENV / "bin" / "python"
    stamp_file = VENV / ".suite-stamp"
    stamp = hashlib.sha256(
        json.dumps([base_interpreter(), requirements,
                    hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()]).encode()
    ).hexdigest()  # fmt: skip
    if not fresh and python.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return python
    log(f"setting up {VENV.relative_to(ROOT)}: loopwatch (editable) + {', '.join(requirements)}")
    if fresh:
        for child in ("bin", "lib", "lib64", "include", "pyvenv.cfg"):
            target = VENV / child
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    steps = [
        [base_interpreter(), "-m", "venv", str(VENV)],
        [str(python), "-m", "pip", "install", "-q", "-e", str(ROOT), *requirements],
    ]
    for step in steps:
        if sh(step, ROOT, logfile, timeout=900) != 0:
            raise SystemExit(f"could not set up {VENV}, see {logfile}")
    stamp_file.write_text(stamp)
    return python


def read_junit(report: Path) -> dict[str, Outcome]:
    """Per-test outcomes from pytest's JUnit XML. A test whose teardown errors after its
    call failed appears twice there: the worse outcome wins."""
    rank = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
    outcomes: dict[str, Outcome] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        props = {p.get("name", ""): p.get("value", "") for p in case.iter("property")}
        nodeid = props.get("nodeid") or f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message, where = "passed", "", ""
        for tag, kind in (("error", "error"), ("failure", "failed"), ("skipped", "skipped")):
            element = case.find(tag)
            if element is not None:
                outcome = kind
                message = (element.get("message") or "").strip()
                frames = _LOOPWATCH_FRAME.findall(element.text or "")
                if frames:
                    path, line, func = frames[-1]
                    where = f"{path}:{line} {func}"
                break
        result = Outcome(nodeid, props.get("backend", "none"), outcome, message, where,
                         props.get("blockbuster", ""), int(props.get("apps_wrapped") or 0))  # fmt: skip
        known = outcomes.get(nodeid)
        if known is not None:  # a second record of the same test: its teardown errored
            result.blockbuster = result.blockbuster or known.blockbuster
            result.apps_wrapped = max(result.apps_wrapped, known.apps_wrapped)
        if known is None or rank[outcome] > rank[known.outcome]:
            outcomes[nodeid] = result
        else:
            known.blockbuster, known.apps_wrapped = result.blockbuster, result.apps_wrapped
    return outcomes


def run_suite(
    name: str, python: Path, tree: Path, extra: Sequence[str], timeout: float
) -> RunResult:
    REPORTS.mkdir(parents=True, exist_ok=True)
    report = REPORTS / f"{name}.xml"
    logfile = REPORTS / f"{name}.log"
    report.unlink(missing_ok=True)
    logfile.write_text("")
    wrap = ["--loopwatch-wrap"] if name == "wrapped" else []
    cmd = [str(python), "-m", "pytest", *PYTEST_ARGS, *wrap, f"--junitxml={report}", "tests",
           *extra]  # fmt: skip
    log(f"== {name}: {' '.join(cmd)}  (log: {logfile.relative_to(ROOT)})")
    started = time.monotonic()
    code = sh(cmd, tree, logfile, timeout)
    result = RunResult(name, time.monotonic() - started, code)
    if report.exists():
        result.outcomes = read_junit(report)
    tail = logfile.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
    log(f"   exit {code} in {result.seconds:.0f}s: {tail[0]}")
    return result


def _kind(o: Outcome) -> str:
    first = o.message.splitlines()[0] if o.message else o.outcome
    first = first if len(first) <= 110 else first[:107] + "..."
    return f"{first}  [{o.where}]" if o.where else first


def compare(bare: RunResult, wrapped: RunResult, top: int) -> int:
    """Print the comparison; returns the number of regressions."""
    backends = sorted({o.backend for o in (*bare.outcomes.values(), *wrapped.outcomes.values())})
    regressions: list[Outcome] = []
    fixed: list[str] = []
    for nodeid, b in bare.outcomes.items():
        w = wrapped.outcomes.get(nodeid)
        if w is None:
            regressions.append(Outcome(nodeid, b.backend, "missing", "not run when wrapped"))
        elif w.outcome in ("failed", "error") and b.outcome not in ("failed", "error"):
            regressions.append(w)
        elif b.outcome in ("failed", "error") and w.outcome == "passed":
            fixed.append(nodeid)

    def counts(outcomes: Iterable[Outcome], backend: str) -> str:
        c = Counter(o.outcome for o in outcomes if o.backend == backend)
        return (f"{c['passed']:5} passed {c['failed'] + c['error']:5} failed "
                f"{c['skipped']:4} skipped")  # fmt: skip

    log("\nbackend   run      outcome   (backend none: the test takes no anyio_backend)")
    for backend in backends:
        log(f"{backend:9} bare    {counts(bare.outcomes.values(), backend)}")
        log(f"{'':9} wrapped {counts(wrapped.outcomes.values(), backend)}"
            f"   regressions: {sum(1 for r in regressions if r.backend == backend)}")  # fmt: skip
    for result in (bare, wrapped):
        guard = Counter(o.blockbuster for o in result.outcomes.values() if o.blockbuster)
        apps = sum(o.apps_wrapped for o in result.outcomes.values())
        log(f"{result.name} run: blockbuster on in {guard['on']} test call(s), off in "
            f"{guard['off']}; {apps} app(s) wrapped in LoopWatchMiddleware")  # fmt: skip
    for backend in backends:
        mine = [r for r in regressions if r.backend == backend]
        if not mine:
            continue
        log(f"\nregressions on {backend}: {len(mine)}, by kind:")
        for kind, n in Counter(_kind(r) for r in mine).most_common(top):
            log(f"  {n:5}  {kind}")
        for r in mine[:3]:
            log(f"        e.g. {r.nodeid}")
    failing_bare = [o.nodeid for o in bare.outcomes.values() if o.outcome in ("failed", "error")]
    if failing_bare:
        log(f"\nfailing bare too (not counted): {len(failing_bare)}, e.g. {failing_bare[0]}")
    if fixed:
        log(f"failing bare, passing wrapped: {len(fixed)}, e.g. {fixed[0]}")
    return len(regressions)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starlette", metavar="VERSION", default=None,
                        help="Starlette version whose suite runs (default: the one installed "
                        "in the interpreter running this script)")  # fmt: skip
    parser.add_argument("--fresh", action="store_true", help="rebuild .venv-starlette")
    parser.add_argument("--timeout", type=float, default=900.0, metavar="SECONDS",
                        help="per pytest run (default 900)")  # fmt: skip
    parser.add_argument("--top", type=int, default=8, metavar="N",
                        help="failure kinds listed per backend (default 8)")  # fmt: skip
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to both pytest runs")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error(f"--timeout={args.timeout!r}: expected a number of seconds above 0")
    if sys.version_info < (3, 11):
        parser.error("needs Python 3.11+ (tomllib; Starlette's suite needs 3.11+ too)")
    version = args.starlette
    if version is None:
        try:
            version = importlib.metadata.version("starlette")
        except importlib.metadata.PackageNotFoundError:
            parser.error("starlette is not installed here: pass --starlette VERSION")

    started = time.monotonic()
    REPORTS.mkdir(parents=True, exist_ok=True)
    setup_log = REPORTS / "setup.log"
    setup_log.write_text("")
    tree = fetch_sdist(version, setup_log)
    python = prepare_venv(tree, test_requirements(tree), setup_log, args.fresh)
    log(f"starlette {version}: suite from {tree.relative_to(ROOT)}, "
        f"set up in {time.monotonic() - started:.0f}s")  # fmt: skip

    bare = run_suite("bare", python, tree, args.pytest_args, args.timeout)
    wrapped = run_suite("wrapped", python, tree, args.pytest_args, args.timeout)
    problems = [f"the {r.name} run did not complete (see {REPORTS.relative_to(ROOT)}/{r.name}.log)"
                for r in (bare, wrapped) if not r.outcomes or r.returncode not in (0, 1)]  # fmt: skip
    if wrapped.outcomes and not any(o.apps_wrapped for o in wrapped.outcomes.values()):
        problems.append("the wrapped run wrapped no app: scripts/starlette_wrap.py's patch of "
                        "TestClient/ASGITransport did not take")  # fmt: skip
    if any(o.blockbuster == "off" for r in (bare, wrapped) for o in r.outcomes.values()):
        problems.append("blockbuster was off during some tests: Starlette's guard must be on")
    for backend in ("asyncio", "trio"):  # the two backends must both have run
        ran = sum(1 for o in wrapped.outcomes.values()
                  if o.backend == backend and o.outcome == "passed")  # fmt: skip
        if wrapped.outcomes and not ran:
            problems.append(f"no test passed on {backend} in the wrapped run: is its backend "
                            "installed in .venv-starlette?")  # fmt: skip
    regressions = compare(bare, wrapped, args.top)
    passed = sum(1 for o in wrapped.outcomes.values() if o.outcome == "passed")
    log(f"\nstarlette suite finished in {time.monotonic() - started:.0f}s")
    for problem in problems:
        log(problem)
    # The closing line CI reads: tests passing wrapped, tests failing wrapped but not bare.
    log(f"starlette suite wrapped: {passed} passed, {regressions} failed")
    return 1 if regressions or problems else 0


if __name__ == "__main__":
    sys.exit(main())
