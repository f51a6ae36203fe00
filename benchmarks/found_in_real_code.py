"""What loopwatch finds in FastAPI's own OAuth2 tutorial, unmodified, under ``loopwatch run``.

``python -m benchmarks.found_in_real_code`` (needs the network: PyPI). It builds
``.venv-real`` with this checkout of loopwatch and the tutorial's dependencies, takes
``docs_src/security/tutorial004.py`` from FastAPI's own source distribution, and serves it with
``loopwatch run -- uvicorn tutorial004:app``. It logs in ``--logins`` times (``POST /token``)
and reads, from the side port, what loopwatch says: each stall's route, kind and culprit, and
the loop time ``POST /token`` took per login.

Ground truth: the tutorial's own ``verify_password``, timed in a process of its own
(``perf_counter``), the same number of times. The table prints the ratio of loopwatch's loop time
per login to it.

The control: FastAPI's SQL tutorial (``docs_src/sql_databases/tutorial001.py``), whose ``def``
routes FastAPI runs in its threadpool, served the same way: loopwatch must blame nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-real"
FASTAPI = "0.165.0"
DEPENDENCIES = [f"fastapi=={FASTAPI}", "uvicorn>=0.30", "pwdlib[argon2]>=0.2", "pyjwt>=2.8",
                "python-multipart>=0.0.9", "sqlmodel>=0.0.22"]  # fmt: skip
TUTORIAL = "docs_src/security/tutorial004.py"
# the innocent control: FastAPI's SQL tutorial, `def` routes on a sync SQLModel session (the
# threadpool runs them): loopwatch must blame nothing
SQL_TUTORIAL = "docs_src/sql_databases/tutorial001.py"

SQL_TRUTH = """
import statistics, sys, time
sys.path.insert(0, ".")
import tutorial001 as t
from sqlmodel import Session
t.create_db_and_tables()
times = []
for i in range(int(sys.argv[1])):
    began = time.perf_counter()
    with Session(t.engine) as session:
        session.add(t.Hero(name=f"truth {i}", secret_name="x"))
        session.commit()
    times.append(time.perf_counter() - began)
print(statistics.median(times), min(times), max(times))
"""

TRUTH = """
import statistics, sys, time
sys.path.insert(0, ".")
import tutorial004 as t
user = t.fake_users_db["johndoe"]["hashed_password"]
times = []
for _ in range(int(sys.argv[1])):
    began = time.perf_counter()
    assert t.verify_password("secret", user)
    times.append(time.perf_counter() - began)
print(statistics.median(times), min(times), max(times))
"""


def _python() -> Path:
    return VENV / "bin" / "python"


def _setup() -> None:
    if not _python().exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(_python()), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "-e", str(ROOT), *DEPENDENCIES], check=True)


def _tutorial(into: Path, path: str = TUTORIAL) -> Path:
    """A tutorial from FastAPI's source distribution, as published."""
    if not list(into.glob("fastapi-*.tar.gz")):
        subprocess.run(
            [str(_python()), "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             "-d", str(into), f"fastapi=={FASTAPI}"],
            check=True,
        )  # fmt: skip
    [sdist] = into.glob("fastapi-*.tar.gz")
    with tarfile.open(sdist) as archive:
        member = archive.getmember(f"fastapi-{FASTAPI}/{path}")
        source = archive.extractfile(member)
        assert source is not None
        target = into / Path(path).name
        target.write_bytes(source.read())
    return target


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return str(response.read().decode())


def _wait(url: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            _get(url)
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"not answering: {url}")


def _login(port: int) -> int:
    body = urllib.parse.urlencode({"username": "johndoe", "password": "secret"}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/token", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(response.status)


def _new_hero(port: int, number: int) -> int:
    body = json.dumps({"name": f"hero {number}", "secret_name": "x"}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/heroes/", data=body, method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(response.status)


def _busy(text: str, route: str, method: str = "POST") -> tuple[float, float]:
    """(loop seconds, requests) of ``method route`` in an exposition."""
    busy = requests = 0.0
    for line in text.splitlines():
        if f'route="{route}"' not in line or f'method="{method}"' not in line:
            continue
        if line.startswith("loopwatch_event_loop_busy_seconds_total{"):
            busy += float(line.rsplit(" ", 1)[1])
        elif line.startswith("loopwatch_requests_total{"):
            requests += float(line.rsplit(" ", 1)[1])
    return busy, requests


def _serve_and_drive(
    work: Path, app: str, threshold: float, drive: Callable[[int], list[int]]
) -> tuple[list[int], list[dict[str, Any]], str]:
    """Serve ``app`` unmodified under ``loopwatch run``; (statuses, stalls, exposition)."""
    port, side = _free_port(), _free_port()
    server = subprocess.Popen(
        [str(VENV / "bin" / "loopwatch"), "run", "--metrics-port", str(side),
         "--threshold", str(threshold), "--",
         str(VENV / "bin" / "uvicorn"), app, "--port", str(port)],
        cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        _wait(f"http://127.0.0.1:{side}/metrics")
        _wait(f"http://127.0.0.1:{port}/docs")
        statuses = drive(port)
        time.sleep(1.0)  # the last stall's close, the accountant's drain
        stalls = json.loads(_get(f"http://127.0.0.1:{side}/stalls"))
        text = _get(f"http://127.0.0.1:{side}/metrics")
    finally:
        server.terminate()
        server.wait(10)
    return statuses, stalls if isinstance(stalls, list) else stalls["stalls"], text


def _truth(work: Path, script: str, n: int) -> tuple[float, float, float]:
    out = subprocess.run(
        [str(_python()), "-c", script, str(n)], cwd=work, check=True, capture_output=True,
        text=True,
    ).stdout.split()  # fmt: skip
    median, fastest, slowest = (float(x) for x in out)
    return median, fastest, slowest


def _report(ring: list[dict[str, Any]], n: int, what: str) -> None:
    kinds = sorted({s["kind"] for s in ring})
    culprits = sorted({s["culprit"].rsplit("/", 1)[-1] for s in ring})
    routes = sorted({f"{s['method']} {s['route']}" for s in ring})
    print("| what loopwatch says | value |")
    print("|---|---|")
    print(f"| stalls | {len(ring)} in {n} {what} |")
    print(f"| route | {', '.join(routes) or '-'} |")
    print(f"| kind | {', '.join(kinds) or '-'} |")
    print(f"| culprit | {'; '.join(culprits) or '-'} |")
    if ring:
        median = statistics.median(s["duration"] for s in ring)
        print(f"| stall duration, median | {median * 1000:.1f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logins", type=int, default=20)
    parser.add_argument("--heroes", type=int, default=50)
    parser.add_argument("--threshold", type=float, default=0.02)
    parser.add_argument("--no-setup", action="store_true", help="reuse .venv-real as it is")
    args = parser.parse_args()
    if not args.no_setup:
        _setup()
    work = Path(tempfile.mkdtemp(prefix="loopwatch-real-"))
    try:
        _tutorial(work, TUTORIAL)
        _tutorial(work, SQL_TUTORIAL)
        median, fastest, slowest = _truth(work, TRUTH, args.logins)
        statuses, ring, text = _serve_and_drive(
            work, "tutorial004:app", args.threshold,
            lambda port: [_login(port) for _ in range(args.logins)],
        )  # fmt: skip
        print(f"FastAPI {FASTAPI} {TUTORIAL}, {args.logins} logins, threshold {args.threshold}s")
        print(f"logins answered: {statuses.count(200)} of {len(statuses)}")
        print(f"verify_password alone (truth): median {median * 1000:.1f} ms "
              f"({fastest * 1000:.1f}-{slowest * 1000:.1f})")  # fmt: skip
        print()
        _report(ring, args.logins, "logins")
        busy, requests = _busy(text, "/token")
        if requests:
            per_login = busy / requests
            print(f"| loop time per login | {per_login * 1000:.1f} ms |")
            print(f"| loop time per login / verify_password | {per_login / median:.2f} |")
        print()
        # the control: the threadpool runs the SQL tutorial's `def` routes
        (work / "database.db").unlink(missing_ok=True)
        commit, _, _ = _truth(work, SQL_TRUTH, args.heroes)
        (work / "database.db").unlink(missing_ok=True)
        statuses, ring, text = _serve_and_drive(
            work, "tutorial001:app", args.threshold,
            lambda port: [_new_hero(port, i) for i in range(args.heroes)],
        )  # fmt: skip
        print(f"FastAPI {FASTAPI} {SQL_TUTORIAL} (`def` routes), {args.heroes} new heroes")
        print(f"requests answered: {statuses.count(200)} of {len(statuses)}")
        print(f"one hero's session and commit alone (truth): median {commit * 1000:.1f} ms")
        print()
        _report(ring, args.heroes, "requests")
        busy, requests = _busy(text, "/heroes/")
        if requests:
            per_request = busy / requests
            print(f"| loop time per request (the framework's own work) | "
                  f"{per_request * 1000:.2f} ms |")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
