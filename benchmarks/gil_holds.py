"""GIL-held calls: detection, culprit and kind against what the app measured itself:
``python -m benchmarks.gil_holds`` (also ``python -m benchmarks.run gil-holds``).

Four calls, each one C call that keeps the GIL for its whole length: ``math.factorial``,
``json.loads`` of a large string of numbers, pydantic-core validating a large body
(``TypeAdapter(list[int]).validate_json``), and ``json.loads`` of many small objects (its
allocations make the garbage collector run for about half of it or more: expected ``gc``).
Each is sized in this process (``--sizes``, seconds per call, threshold 0.1 s) and made
``--n`` times per size, in interleaved rounds, in each setting:

- ``uvicorn asyncio`` / ``uvicorn uvloop``: a real uvicorn process (one worker) on
  127.0.0.1 serving ``benchmarks.gil_holds:app`` (``LoopWatchMiddleware``, threshold 0.1 s,
  an ``on_stall`` callback keeping every stall), one request at a time over HTTP, 0.3 s apart;
- under the pytest plugin: a generated test file run in a subprocess with ``pytest
  --loopwatch --loopwatch-threshold 0.1 --loopwatch-report report.json``, the call inside
  ``asyncio.run(main())`` after a first ``await asyncio.sleep(0.1)`` (``asyncio.run``), in a
  FastAPI endpoint called through ``with TestClient(app)`` (``TestClient``), and inside
  ``asyncio.run`` as the loop's very first step (``asyncio.run (first step)``: before the
  loop's watchdog has run, a known limit).

The app (or test) times each call itself (``time.perf_counter`` around the call, its result
dropped on the same line, so freeing it is part of it) and its garbage collection
(``gc.callbacks``). A stall is matched to the call whose time it overlaps. Per call x size x
setting the harness prints: detected / N, route right / N (under the plugin also charged to
the test that made it), culprit line right / N, kind right / N, and the stall's duration
minus the call's own (median and worst, ms). Asserts nothing.
"""

# -- shared with the generated test file: begin (copied into it verbatim) ------------------
import gc
import json
import math
import time
from typing import Any

import pydantic

NUMBERS = pydantic.TypeAdapter(list[int])
CALLS = ("factorial", "json", "pydantic", "objects")
_GC = {"began": 0.0, "seconds": 0.0, "long": 0.0}


def _time_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _GC["began"] = time.perf_counter()
    else:
        took = time.perf_counter() - _GC["began"]
        _GC["seconds"] += took
        if took >= 0.001:  # the collections loopwatch keeps (1 ms or more)
            _GC["long"] += took


def make_work(name: str, n: int) -> Any:
    """What one call works on: n for factorial, else a JSON text."""
    if name == "factorial":
        return n
    if name == "objects":
        return json.dumps([{"id": i, "tags": ["x", "y"], "o": {"k": i}} for i in range(n)])
    return json.dumps(list(range(n)))  # numbers: nothing the collector tracks


def hold(name: str, work: Any) -> dict[str, float]:
    """One call, timed; its result is dropped on the call's line (freeing it is part of it)."""
    wall, cpu = time.time(), time.thread_time()
    began = time.perf_counter()
    if name == "factorial":
        math.factorial(work).bit_length()  # CALL factorial
    elif name == "json":
        len(json.loads(work))  # CALL json
    elif name == "pydantic":
        len(NUMBERS.validate_json(work))  # CALL pydantic
    else:
        len(json.loads(work))  # CALL objects
    took = time.perf_counter() - began
    return {"wall": wall, "seconds": took, "cpu": time.thread_time() - cpu}


def gc_share(name: str, work: Any) -> dict[str, float]:
    """The collector's share of one call, in all collections and in those of 1 ms or more,
    timed apart from the measured calls: the timer is a Python callback, and one that ran
    during them would be named as their culprit (it is app code)."""
    _GC.update(seconds=0.0, long=0.0)
    gc.collect()
    gc.callbacks.append(_time_gc)
    try:
        took = hold(name, work)["seconds"]
    finally:
        gc.callbacks.remove(_time_gc)
    return {"gc": _GC["seconds"] / took, "gc_long": _GC["long"] / took}


# -- shared: end ---------------------------------------------------------------------------

import argparse  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.serving import free_port, get  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIZES = (0.15, 0.3, 0.6)
THRESHOLD = 0.1
KIND = {"factorial": "gil", "json": "gil", "pydantic": "gil", "objects": "gc"}
LABEL = {
    "factorial": "math.factorial",
    "json": "json.loads (numbers)",
    "pydantic": "TypeAdapter(list[int]).validate_json",
    "objects": "json.loads (objects)",
}
SHORT = {
    "factorial": "factorial",
    "json": "json.loads numbers",
    "pydantic": "pydantic list[int]",
    "objects": "json.loads objects",
}
UVICORN = ("uvicorn asyncio", "uvicorn uvloop")
PLUGIN = ("asyncio.run", "TestClient", "asyncio.run (first step)")
SETTINGS = (*UVICORN, *PLUGIN)
GAP = 0.3  # seconds between two calls on a server: the loop free between two holds


def key(size: float) -> str:
    return f"{size:g}"


def call_line(source: str, name: str) -> int:
    """1-based line of the call ``name`` in ``source``."""
    marker = f"# CALL {name}"
    for number, line in enumerate(source.splitlines(), start=1):
        if line.rstrip().endswith(marker):
            return number
    raise LookupError(marker)


def shared_source() -> str:
    text = Path(__file__).read_text()
    begin = text.index("# -- shared with the generated test file: begin")
    end = text.index("# -- shared: end")
    return text[begin:end]


# -- sizing ---------------------------------------------------------------------------------

_START = {"factorial": 100_000, "json": 1_000_000, "pydantic": 1_000_000, "objects": 100_000}


def calibrate(sizes: Sequence[float]) -> dict[str, dict[str, int]]:
    """n per call and size: the n whose call takes about that long here (within 10 %) in
    thread CPU time, which a loaded machine does not stretch (the wall time it does)."""
    found: dict[str, dict[str, int]] = {}
    for name in CALLS:
        found[name] = {}
        n = _START[name]
        exponent = 1.6 if name == "factorial" else 1.0  # factorial grows faster than n
        for target in sorted(sizes):
            for _ in range(8):
                work = make_work(name, n)
                took = min(hold(name, work)["cpu"] for _ in range(2))
                if 0.9 * target <= took <= 1.1 * target:
                    break
                n = max(1000, int(n * (target / took) ** (1 / exponent)))
            found[name][key(target)] = n
            _progress(f"sized {name} {target:g} s: n={n} ({took:.3f} s of CPU)")
    return found


# -- the uvicorn app ------------------------------------------------------------------------


def build_app() -> Any:
    from fastapi import FastAPI

    from loopwatch import LoopWatchMiddleware, Stall

    sizes: dict[str, dict[str, int]] = json.loads(os.environ["BENCH_GIL_SIZES"])
    works = {(name, s): make_work(name, n) for name, by in sizes.items() for s, n in by.items()}
    shares = {f"{name} {s}": gc_share(name, work) for (name, s), work in works.items()}
    calls: list[dict[str, Any]] = []
    stalls: list[dict[str, Any]] = []

    def keep(stall: Stall) -> None:
        stalls.append(stall.as_dict())

    api = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    def make(name: str) -> Any:
        async def endpoint(size: str) -> dict[str, str]:
            record = hold(name, works[name, size])
            calls.append({**record, **shares[f"{name} {size}"], "name": name, "size": size})
            return {}

        return endpoint

    for name in CALLS:
        method = "POST" if name == "pydantic" else "GET"
        api.add_api_route(f"/{name}", make(name), methods=[method])

    @api.get("/up")
    async def up() -> dict[str, str]:
        import loopwatch

        return {"loopwatch": loopwatch.__file__}

    @api.get("/truth")
    async def truth() -> dict[str, Any]:
        return {"calls": calls, "stalls": stalls}

    api.add_middleware(LoopWatchMiddleware, threshold=THRESHOLD, on_stall=keep)
    return api


if os.environ.get("BENCH_GIL_APP") == "1":
    app = build_app()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPWATCH_", "BENCH_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return {**env, **extra}


class Server:
    """``uvicorn benchmarks.gil_holds:app --loop LOOP`` in a subprocess."""

    def __init__(self, loop: str, sizes: dict[str, dict[str, int]], server_cpu: str) -> None:
        self.loop = loop
        self.url = f"http://127.0.0.1:{free_port()}"
        pin = ["taskset", "-c", server_cpu] if server_cpu else []
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [*pin, sys.executable, "-m", "uvicorn", "benchmarks.gil_holds:app", "--host",
             "127.0.0.1", "--port", self.url.rsplit(":", 1)[1], "--loop", loop,
             "--no-access-log", "--log-level", "warning"],
            cwd=ROOT, env=_env(BENCH_GIL_APP="1", BENCH_GIL_SIZES=json.dumps(sizes)),
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_up(self) -> str:
        deadline = time.monotonic() + 120  # it builds the texts and times their GC first
        while True:
            try:
                where: str = json.loads(get(self.url + "/up"))["loopwatch"]
                return where
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.log.seek(0)
                    raise RuntimeError(self.log.read().decode(errors="replace")) from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def run_uvicorn(
    loops: Sequence[str], sizes: dict[str, dict[str, int]], n: int, server_cpu: str
) -> dict[str, Any]:
    """Both servers up side by side; each round makes every call x size on each in turn, one
    request at a time, GAP seconds apart."""
    servers: list[Server] = []
    calls: list[dict[str, Any]] = []
    stalls: list[dict[str, Any]] = []
    try:
        for loop in loops:
            servers.append(Server(loop, sizes, server_cpu))
        for server in servers:
            _progress(f"uvicorn --loop {server.loop} up (loopwatch from {server.wait_up()})")
        time.sleep(0.5)
        for round_no in range(n):
            for name in CALLS:
                for size in sizes[name]:
                    for server in servers:
                        method = "POST" if name == "pydantic" else "GET"
                        get(f"{server.url}/{name}?size={size}", method)
                        time.sleep(GAP)
            _progress(f"uvicorn round {round_no + 1}/{n}")
        time.sleep(1.0)  # the last stall's report
        path = str(ROOT / "benchmarks" / "gil_holds.py")
        for server in servers:
            result = json.loads(get(server.url + "/truth"))
            setting = f"uvicorn {server.loop}"
            calls += [
                {**c, "setting": setting, "file": path, "test": None} for c in result["calls"]
            ]
            stalls += [{**s, "setting": setting} for s in result["stalls"]]
    finally:
        for server in servers:
            server.stop()
    return {"calls": calls, "stalls": stalls}


# -- the pytest plugin ----------------------------------------------------------------------

_SUITE = """
import asyncio
import os

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from loopwatch import LoopWatchMiddleware

SIZES = json.loads(os.environ["BENCH_GIL_SIZES"])
WORK = {(name, s): make_work(name, n) for name, by in SIZES.items() for s, n in by.items()}
SHARES = {key: gc_share(key[0], work) for key, work in WORK.items()}
CASES = json.loads(os.environ["BENCH_GIL_CASES"])

app = FastAPI()
app.state.last = None


def route(name):
    async def endpoint(size: str):
        app.state.last = hold(name, WORK[name, size])
        return {}

    return endpoint


for _name in CALLS:
    app.add_api_route(f"/{_name}", route(_name), methods=["POST" if _name == "pydantic" else "GET"])
app.add_middleware(LoopWatchMiddleware, registry=CollectorRegistry())


@pytest.mark.parametrize("setting,name,size", CASES, ids=[f"{i}" for i in range(len(CASES))])
def test_hold(setting, name, size):
    if setting == "TestClient":
        with TestClient(app) as client:
            method = "POST" if name == "pydantic" else "GET"
            assert client.request(method, f"/{name}", params={"size": size}).status_code == 200
        record = app.state.last
    else:
        async def main():
            if setting == "asyncio.run":
                await asyncio.sleep(0.1)  # not the loop's first step
            done = hold(name, WORK[name, size])
            await asyncio.sleep(0.05)
            return done

        record = asyncio.run(main())
    test = os.environ["PYTEST_CURRENT_TEST"].rsplit(" (", 1)[0]
    with open(os.environ["BENCH_GIL_TRUTH"], "a") as out:
        out.write(json.dumps({**record, **SHARES[name, size], "setting": setting, "name": name,
                              "size": size, "test": test, "file": __file__}) + "\\n")
"""


def run_plugin(sizes: dict[str, dict[str, int]], n: int, settings: Sequence[str]) -> dict[str, Any]:
    cases = [
        [setting, name, size]
        for _ in range(n)
        for setting in settings
        for name in CALLS
        for size in sizes[name]
    ]
    with tempfile.TemporaryDirectory(prefix="loopwatch-gil-") as tmp:
        here = Path(tmp)
        (here / "test_gil_holds.py").write_text(shared_source() + _SUITE)
        truth_path = here / "truth.jsonl"
        command = [
            sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
            "-q", "--tb=no", "--loopwatch", "--loopwatch-threshold", str(THRESHOLD),
            "--loopwatch-report", "report.json", "test_gil_holds.py",
        ]  # fmt: skip
        _progress(f"pytest: {len(cases)} tests ({', '.join(settings)})")
        env = _env(
            BENCH_GIL_SIZES=json.dumps(sizes),
            BENCH_GIL_CASES=json.dumps(cases),
            BENCH_GIL_TRUTH=str(truth_path),
        )
        done = subprocess.run(
            command, cwd=here, env=env, capture_output=True, text=True, timeout=1800
        )
        if not (here / "report.json").exists():
            raise RuntimeError(
                f"pytest wrote no report:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        report = json.loads((here / "report.json").read_text())
        calls = [json.loads(line) for line in truth_path.read_text().splitlines() if line]
    tail = done.stdout.strip().splitlines()[-1:] if done.stdout.strip() else []
    return {
        "calls": calls,
        "stalls": report["stalls"],
        "summary": tail,
        "command": " ".join(command[2:]),
    }


# -- matching and the table -----------------------------------------------------------------


def match(calls: list[dict[str, Any]], stalls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each call with the stalls overlapping it in time (``stalls``, the one overlapping it
    most first: the one judged); the stalls that overlap no call are returned as rows with
    ``setting`` = None. Under the plugin a stall is not matched by the test it was charged
    to: being charged to the right test is judged."""
    used: set[int] = set()
    rows = []
    for call in calls:
        begin, end = call["wall"], call["wall"] + call["seconds"]
        mine = []
        for i, s in enumerate(stalls):
            overlap = min(end, s["started_at"] + s["duration"]) - max(begin, s["started_at"])
            if overlap > 0:
                mine.append((overlap, i, s))
        mine.sort(key=lambda m: -m[0])
        used.update(i for _, i, _ in mine)
        rows.append({**call, "stalls": [s for _, _, s in mine]})
    rows += [{"setting": None, "stray": s} for i, s in enumerate(stalls) if i not in used]
    return rows


def judge(row: dict[str, Any], source_lines: dict[str, int]) -> dict[str, Any]:
    name, setting = row["name"], row["setting"]
    stalls = row["stalls"]
    if not stalls:
        return {"detected": False}
    stall = stalls[0]
    if setting in UVICORN or setting == "TestClient":
        route = (stall["method"], stall["route"]) == (
            "POST" if name == "pydantic" else "GET",
            f"/{name}",
        )
    else:
        # outside any request: the test's task, named by its coroutine (``main``, nested in
        # the generated test function)
        route = stall["method"] == "-" and stall["route"].endswith(".main>")
    if row["test"] is not None:
        route = route and stall.get("test") == row["test"]
    line = source_lines[f"{Path(row['file']).name}:{name}"]
    culprit = stall["culprit"]
    line_right = culprit.endswith(f"{Path(row['file']).name}:{line} in hold") and (
        Path(row["file"]).name == Path(culprit.rsplit(":", 1)[0]).name
    )
    return {
        "detected": True,
        "pieces": len(stalls),
        "route": route,
        "line": line_right,
        "kind": stall["kind"] == KIND[name],
        "kind_seen": stall["kind"],
        "error": stall["duration"] - row["seconds"],
        "culprit": culprit,
        "gc_seen": stall.get("gc_seconds", 0.0),
        "cpu_seen": stall.get("cpu_seconds", 0.0),
    }


def table(rows: list[dict[str, Any]], n: int, sizes: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the full table, the compact one: a row per call x size, a column per setting)."""
    full = [
        "| call | size | setting | call s median (min) | on CPU | GC share apart (1 ms+ only) | detected | route | line | "
        "kind | kinds seen | error ms median (worst) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    compact = [
        "| call | size | " + " | ".join(SETTINGS) + " |",
        "|---|---:|" + "---|" * len(SETTINGS),
    ]
    for name in CALLS:
        for size in sizes:
            cells = []
            for setting in SETTINGS:
                mine = [
                    r
                    for r in rows
                    if r.get("setting") == setting and r["name"] == name and r["size"] == size
                ]
                if not mine:
                    cells.append("-")
                    continue
                got = [r["judged"] for r in mine]
                count = len(mine)
                det = sum(g["detected"] for g in got)
                route = sum(g.get("route", False) for g in got)
                line = sum(g.get("line", False) for g in got)
                kind = sum(g.get("kind", False) for g in got)
                kinds: dict[str, int] = {}
                for g in got:
                    seen = g.get("kind_seen", "none")
                    kinds[seen] = kinds.get(seen, 0) + 1
                errors = [1000 * g["error"] for g in got if g["detected"]]
                error = (
                    f"{statistics.median(errors):+.0f} ({max(errors, key=abs):+.0f})"
                    if errors
                    else "-"
                )
                took = [r["seconds"] for r in mine]
                share = statistics.median(r["gc"] for r in mine)
                share_long = statistics.median(r["gc_long"] for r in mine)
                on_cpu = statistics.median(r["cpu"] / r["seconds"] for r in mine)
                seen = ", ".join(
                    f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])
                )
                full.append(
                    f"| {LABEL[name]} | {size} s | {setting} | {statistics.median(took):.3f} ({min(took):.3f}) | {100 * on_cpu:.0f}% | {100 * share:.0f}% ({100 * share_long:.0f}%) | "
                    f"{det}/{count} | {route}/{count} | {line}/{count} | {kind}/{count} | {seen} | "
                    f"{error} |"
                )
                of = "" if count == n else f" of {count}"
                cells.append(f"{det}/{route}/{line}/{kind}{of} · {error}")
            compact.append(f"| {SHORT[name]} | {size} s | " + " | ".join(cells) + " |")
    return full, compact


def _progress(message: str) -> None:
    print(f"[gil-holds {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gil_holds", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--n", type=int, default=10, help="calls per call x size x setting")
    parser.add_argument("--sizes", default=",".join(map(key, SIZES)), help="seconds per call")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"some of {SETTINGS}")
    parser.add_argument("--server-cpu", default="", help="pin uvicorn to these CPUs (taskset)")
    parser.add_argument("--json", type=Path, help="also write every call and stall here")
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    args = parser.parse_args(argv)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if args.n < 1 or not settings or not set(settings) <= set(SETTINGS):
        parser.error(f"--n must be >= 1 and --settings some of {', '.join(SETTINGS)}")
    started = time.monotonic()
    load_start = os.getloadavg()
    sizes = calibrate([float(s) for s in args.sizes.split(",") if s])
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    loops = [s.split()[1] for s in settings if s in UVICORN]
    if loops:
        result = run_uvicorn(loops, sizes, args.n, args.server_cpu)
        for setting in UVICORN:
            rows += match(
                [c for c in result["calls"] if c["setting"] == setting],
                [s for s in result["stalls"] if s["setting"] == setting],
            )
    plugin_settings = [s for s in settings if s in PLUGIN]
    if plugin_settings:
        result = run_plugin(sizes, args.n, plugin_settings)
        extra["pytest"] = result["summary"]
        rows += match(result["calls"], result["stalls"])
    lines: dict[str, int] = {}
    shared = shared_source()
    offset = Path(__file__).read_text().index(shared)
    first = Path(__file__).read_text()[:offset].count("\n")
    for name in CALLS:
        lines[f"gil_holds.py:{name}"] = first + call_line(shared, name)
        lines[f"test_gil_holds.py:{name}"] = call_line(shared, name)
    for row in rows:
        if row.get("setting") is not None:
            row["judged"] = judge(row, lines)
    size_keys = list(next(iter(sizes.values())))
    full, compact = table(rows, args.n, size_keys)
    stray = [r["stray"] for r in rows if r.get("setting") is None]
    seconds = time.monotonic() - started
    command = "python -m benchmarks.gil_holds " + " ".join(sys.argv[1:] if argv is None else argv)
    text = [
        f"`{command.strip()}`: Python {platform.python_version()}, threshold {THRESHOLD:g} s, "
        f"{args.n} calls per call x size x setting; load average at start "
        f"{' '.join(f'{x:.2f}' for x in load_start)}, at end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} cores; run time "
        f"{seconds:.0f} s.",
        "",
        "sizes (n): "
        + "; ".join(
            f"{name} " + ", ".join(f"{s} s: {v}" for s, v in by.items())
            for name, by in sizes.items()
        ),
        "",
        f"Each cell: detected/route right/culprit line right/kind right, of {args.n} calls · "
        "the stall's duration minus the call's own, ms, median (worst).",
        "",
        *compact,
        "",
        *full,
        "",
        f"stalls matching no call: {len(stray)}"
        + "".join(
            f"\n- {s.get('test') or ''} {s['method']} {s['route']} {s['kind']} {s['duration']:.3f} s at {s['culprit']}"
            for s in stray
        ),
    ]
    split = [r for r in rows if r.get("setting") is not None and len(r["stalls"]) > 1]
    text.append(f"\ncalls overlapped by more than one stall (a hold split): {len(split)}")
    text += [
        f"- {r['setting']} {r['name']} {r['size']} (call {r['seconds']:.3f} s): "
        + "; ".join(
            f"{s['method']} {s['route']} {s['kind']} {s['duration']:.3f} s" for s in r["stalls"]
        )
        for r in split
    ]
    if extra.get("pytest"):
        text.append(f"\npytest: {extra['pytest'][0]}")
    misses = [
        (r["setting"], r["name"], r["size"], r["seconds"], r["cpu"], r["judged"])
        for r in rows
        if r.get("setting") is not None
        and not (
            r["judged"]["detected"]
            and r["judged"]["route"]
            and r["judged"]["line"]
            and r["judged"]["kind"]
        )
    ]
    if misses:
        text.append("\nmisses:")
        for setting, name, size, seconds, cpu, judged in misses:
            text.append(
                f"- {setting} {name} {size} (call {seconds:.3f} s, {cpu:.3f} s on CPU): "
                + (
                    "not detected"
                    if not judged["detected"]
                    else f"route {'right' if judged['route'] else 'wrong'}, kind "
                    f"{judged['kind_seen']} (cpu_seconds {judged['cpu_seen']:.3f}, gc_seconds "
                    f"{judged['gc_seen']:.3f}), culprit {Path(judged['culprit']).name}, "
                    f"error {1000 * judged['error']:+.0f} ms, stalls {judged['pieces']}"
                )
            )
    output = "\n".join(text) + "\n"
    print(output)
    if args.markdown:
        args.markdown.write_text(output)
    if args.json:
        args.json.write_text(json.dumps({"sizes": sizes, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
