"""pytest plugin: fail the test whose code blocks the event loop.

Off until enabled (``--loopwatch``, the ini key ``loopwatch = true`` or ``LOOPWATCH_PYTEST=1``);
until then it only registers its options and its marker. Once enabled it wraps
``asyncio.BaseEventLoop.run_forever``, the one method every asyncio loop runs through
(pytest-asyncio's and anyio's runners, ``asyncio.run``, Starlette's ``TestClient`` portal,
a uvicorn server in a thread), so each run of a loop gets a ``Monitor`` for exactly as long as
the loop runs. Every stall is charged to the test (and phase, and fixture) that owns the loop,
and that test's report is turned into a failure naming the route, the culprit line, the
duration, ``cpu``/``wait`` and the loop thread's stack.

A loop is owned by the test during whose setup, call or teardown it started running. A stall in
a loop owned by a finished test, by a fixture wider than a function or by no test at all is not
blamed on whichever test happens to run: it is listed at the end of the run and fails the run.
Under pytest-xdist each worker sends its stalls to the controller, which lists them and writes
the one report.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import pytest

from loopwatch.config import ConfigError, Settings
from loopwatch.stall import BACKGROUND, SERVER, Stall

if TYPE_CHECKING:
    import asyncio

    from loopwatch.monitor import Monitor

__all__ = ["allow_blocking"]

ENV_ENABLE = "LOOPWATCH_PYTEST"
DEFAULT_THRESHOLD = Settings.threshold
# How long the end of a phase waits for loops in other threads to report a stall in progress.
SETTLE_SECONDS = 0.5
REPORT_VERSION = 1

_MARKER_HELP = (
    "loopwatch(threshold=None, allow=False): loopwatch's event loop guard for this test: "
    "threshold=<seconds> overrides --loopwatch-threshold, allow=True lets the test block."
)
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})
_BOOL_EXPECTED = "one of 1/0, true/false, yes/no, on/off"
_SECONDS_EXPECTED = "a finite number of seconds above 0"

# The guard of the configured session, read by the patched run_forever; None when disabled.
_active: _Guard | None = None


# -- options ----------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("loopwatch", "fail tests that block the asyncio event loop")
    group.addoption(
        "--loopwatch",
        action="store_true",
        default=False,
        help=f"fail each test during which the event loop is blocked past the threshold "
        f"(also: ini loopwatch = true, or {ENV_ENABLE}=1).",
    )
    group.addoption(
        "--loopwatch-threshold",
        metavar="SECONDS",
        default=None,
        help=f"blocking longer than this fails the test (default {DEFAULT_THRESHOLD}); "
        "implies --loopwatch.",
    )
    group.addoption(
        "--loopwatch-report",
        metavar="FILE",
        default=None,
        help="write every stall as JSON to FILE (for CI artefacts); implies --loopwatch.",
    )
    parser.addini("loopwatch", "enable loopwatch's event loop guard (true/false)", default="")
    parser.addini(
        "loopwatch_threshold", "loopwatch: seconds of blocking that fail a test", default=""
    )
    parser.addini("loopwatch_report", "loopwatch: JSON report file of every stall", default="")


@dataclass(frozen=True)
class _Options:
    enabled: bool
    threshold: float
    report: str | None
    threshold_source: str = "default"


def _parse_bool(text: str, source: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError("loopwatch", text, source, _BOOL_EXPECTED)


def _parse_seconds(value: object, source: str, option: str = "threshold") -> float:
    if isinstance(value, bool):
        raise ConfigError(option, value, source, _SECONDS_EXPECTED)
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(option, value, source, _SECONDS_EXPECTED) from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(option, value, source, _SECONDS_EXPECTED)
    return seconds


def _read_options(config: pytest.Config) -> _Options:
    """Command line beats the environment, which beats the ini file."""
    cli_threshold: str | None = config.getoption("loopwatch_threshold")
    cli_report: str | None = config.getoption("loopwatch_report")
    ini_enabled = str(config.getini("loopwatch"))
    if config.getoption("loopwatch") or cli_threshold is not None or cli_report is not None:
        enabled = True
    elif ENV_ENABLE in os.environ:
        enabled = _parse_bool(os.environ[ENV_ENABLE], f"environment variable {ENV_ENABLE}")
    else:
        enabled = _parse_bool(ini_enabled, "ini key loopwatch")
    if not enabled:
        return _Options(False, DEFAULT_THRESHOLD, None)
    ini_threshold = str(config.getini("loopwatch_threshold")).strip()
    source = "default"
    threshold = DEFAULT_THRESHOLD
    if cli_threshold is not None:
        source = "command line option --loopwatch-threshold"
        threshold = _parse_seconds(cli_threshold, source)
    elif ini_threshold:
        source = "ini key loopwatch_threshold"
        threshold = _parse_seconds(ini_threshold, source)
    report = cli_report or str(config.getini("loopwatch_report")).strip() or None
    return _Options(True, threshold, report, source)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", _MARKER_HELP)
    try:
        options = _read_options(config)
    except ConfigError as error:
        raise pytest.UsageError(str(error)) from None
    if options.enabled:
        guard = _Guard(config, options)
        config.pluginmanager.register(guard, "loopwatch-guard")
        guard.install()


def pytest_unconfigure(config: pytest.Config) -> None:
    guard = config.pluginmanager.get_plugin("loopwatch-guard")
    if isinstance(guard, _Guard):
        guard.uninstall()
        config.pluginmanager.unregister(guard)


@contextlib.contextmanager
def allow_blocking() -> Iterator[None]:
    """Exempt the blocking done inside this block (on any loop, any thread) from failing the
    test. A stall that runs past the block still fails if its part outside reaches the
    threshold. Does nothing when the plugin is disabled."""
    guard = _active
    if guard is None:
        yield
        return
    window = guard.open_window()
    try:
        yield
    finally:
        window[1] = time.time()


# -- who owns a loop --------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    """What pytest is running: a test's phase, and the fixture being set up, if any."""

    nodeid: str
    phase: str  # setup, call or teardown
    fixture: str | None
    fixture_scope: str | None
    threshold: float
    allow: bool

    def describe(self) -> str:
        if self.fixture is not None:
            return f"{self.phase} of fixture {self.fixture!r} ({self.fixture_scope} scope)"
        return self.phase


@dataclass(frozen=True)
class _Record:
    """One stall, and what it was charged to."""

    stall: Stall
    context: _Context | None  # None: not charged to a test, reported at the end of the run
    loop_thread: str
    loop_owner: str
    threshold: float
    verdict: str  # failed, allowed or below-threshold
    worker: str | None = None  # the pytest-xdist worker that ran the loop

    def as_dict(self) -> dict[str, object]:
        ctx = self.context
        return {
            "test": ctx.nodeid if ctx is not None else None,
            "phase": ctx.phase if ctx is not None else None,
            "fixture": ctx.fixture if ctx is not None else None,
            "verdict": self.verdict,
            "threshold": self.threshold,
            "worker": self.worker,
            "loop_thread": self.loop_thread,
            "loop_owner": self.loop_owner,
            **self.stall.as_dict(),
        }

    def lines(self) -> list[str]:
        stall, ctx = self.stall, self.context
        if stall.method == "-" and stall.route == BACKGROUND:
            route = "none recorded (outside any request seen by LoopWatchMiddleware)"
        else:
            route = f"{stall.method} {stall.route}"
        during = ctx.describe() if ctx is not None else "no test (see loop)"
        stack = _fold_library_frames(stall.stack)
        where = f" of xdist worker {self.worker}" if self.worker is not None else ""
        return [
            f"event loop blocked for {stall.duration:.3f}s (threshold {self.threshold:g}s) "
            f"during {during}",
            f"  route:    {route}",
            f"  culprit:  {stall.culprit}{_C_CALLBACK if _blames_the_runner(stall) else ''}",
            f"  kind:     {stall.kind} ({stall.cpu_seconds:.3f}s of CPU on the loop thread)",
            f"  loop:     thread {self.loop_thread!r}{where}, started during {self.loop_owner}",
            "  loop thread stack (innermost last):",
            *(f"    {line}" for line in stack or ["<not sampled>"]),
        ]


_C_CALLBACK = " (the loop ran a C function as a callback: no Python frame of its own)"


def _blames_the_runner(stall: Stall) -> bool:
    """The innermost Python frame is the loop running a callback (asyncio's ``Handle._run``,
    or this plugin's ``run_forever`` around a C loop): the callback itself is C code, such as
    ``loop.call_soon_threadsafe(time.sleep, 1)``."""
    path, _, where = stall.culprit.rpartition(":")
    return (where.endswith(" in _run") and path.endswith(os.path.join("asyncio", "events.py"))) or (
        where.endswith(" in run_forever") and path == __file__
    )


_FRAME = re.compile(r'^\s*File "(?P<path>[^"]+)", line \d+, in ')


def _fold_library_frames(stack: str) -> list[str]:
    """The stack's lines, with each run of library frames (stdlib, site-packages, pytest)
    folded to one line; the innermost frame is always kept."""
    from loopwatch.attribution import CodeFilter

    is_app = CodeFilter().is_app
    frames: list[list[str]] = []
    for line in stack.rstrip("\n").splitlines():
        if _FRAME.match(line) or not frames:
            frames.append([line.strip()])
        else:
            frames[-1].append("  " + line.strip())
    lines: list[str] = []
    folded = 0
    for index, frame in enumerate(frames):
        match = _FRAME.match(frame[0])
        if match and not is_app(match["path"]) and index < len(frames) - 1:
            folded += 1
            continue
        if folded:
            lines.append(f"... {folded} library frame(s) ...")
            folded = 0
        lines.extend(frame)
    return lines


class _StallFailure:
    """A report's longrepr: the stalls that failed the phase."""

    def __init__(self, records: list[_Record]) -> None:
        self.records = records
        first = records[0].stall
        more = f" (+{len(records) - 1} more)" if len(records) > 1 else ""
        self.reprcrash = _Crash(
            f"loopwatch: event loop blocked for {first.duration:.3f}s at {first.culprit}{more}"
        )

    def toterminal(self, tw: Any) -> None:
        for line in str(self).splitlines():
            tw.line(line, red=line.startswith("event loop blocked"))

    def __str__(self) -> str:
        return "\n".join(line for record in self.records for line in record.lines())


@dataclass(frozen=True)
class _Crash:
    message: str


class _Watch:
    """One run of one event loop (one ``run_forever`` call) and its monitor."""

    def __init__(self, guard: _Guard, monitor: Monitor, owner: _Context | None, own: bool) -> None:
        self.guard = guard
        self.monitor = monitor
        self.owner = owner
        self.own = own  # we started the monitor, so we stop it when the run ends
        thread = threading.current_thread()
        self.thread_name = thread.name
        self.on_main = thread.ident == guard.main_thread

        # the lag the monitor's heartbeat had accumulated when this run was last settled
        self._settled_lag = monitor.lag.total

    def on_stall(self, stall: Stall) -> None:
        self.guard.charge(self, stall)

    def on_busy(self, key: tuple[str, str], seconds: float) -> None:
        self.guard.charge_busy(self, key, seconds)

    def quiet(self) -> bool:
        """Nothing to settle: no hold is open or in progress, and none has ended since the
        last settle (the heartbeat has not been late by anything near the threshold), so no
        stall can be on its way. Checked without waiting for a watchdog check, which would
        cost a phase up to one check interval."""
        monitor = self.monitor
        # last_beat before the lag: the heartbeat records a late beat's lag, then the beat
        # (the monitor's clock is time.monotonic; the watchdog's own test of a late beat)
        fresh = time.monotonic() - monitor.last_beat <= monitor.interval * 1.5
        late = monitor.lag.total - self._settled_lag
        return fresh and late < (monitor.threshold - monitor.interval) / 2 and not monitor.stalling

    def settle(self, timeout: float) -> bool:
        lag = self.monitor.lag.total
        if not self.monitor.settle(timeout):
            return False
        self._settled_lag = lag
        return True

    def owner_text(self) -> str:
        owner = self.owner
        if owner is None:
            return "no test"
        return f"{owner.describe()} of {owner.nodeid}"


# -- the guard: hooks that only exist while enabled -----------------------------------


class _Guard:
    def __init__(self, config: pytest.Config, options: _Options) -> None:
        self.config = config
        self.threshold = options.threshold
        self.threshold_source = options.threshold_source
        self.report_path = options.report
        self.main_thread = threading.get_ident()
        self.records: list[_Record] = []
        # pytest-xdist: a worker sends its stalls to the controller, which lists and reports
        # them with its own (it runs no test, so these are all the run's stalls)
        workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
        self.worker: str | None = workerinput["workerid"] if workerinput is not None else None
        self._remote: list[_RemoteStalls] = []
        self._lock = threading.Lock()
        self._live: set[_Watch] = set()
        self._windows: list[list[float]] = []
        self._settings: dict[float, Settings] = {}
        self._context: _Context | None = None
        self._item_threshold = self.threshold
        self._item_allow = False
        self._item_error: ConfigError | None = None
        self._fixtures: list[tuple[str, str]] = []
        self._originals: list[tuple[type, Callable[..., Any] | None]] = []
        self._failed_nodeids: set[str] = set()
        # nodeid -> "METHOD ROUTE" -> loop seconds booked while the test ran (every phase)
        self.loop_time: dict[str, dict[str, float]] = {}

    # patching --------------------------------------------------------------------------

    def install(self) -> None:
        global _active
        import asyncio
        import sys

        classes: list[type] = [asyncio.BaseEventLoop]
        uvloop = sys.modules.get("uvloop")
        if uvloop is None and importlib.util.find_spec("uvloop") is not None:
            # uvloop's Loop does not derive from BaseEventLoop, and it must be patched before
            # a test creates one (uvicorn does, with loop="auto")
            uvloop = importlib.import_module("uvloop")
        if uvloop is not None and isinstance(getattr(uvloop, "Loop", None), type):
            classes.append(uvloop.Loop)
        for cls in classes:
            original = getattr(cls, "run_forever", None)
            if original is None or getattr(original, "__loopwatch__", False):
                continue
            # uvloop.Loop inherits run_forever from its compiled base: delete ours to restore
            self._originals.append((cls, cls.__dict__.get("run_forever")))
            cls.run_forever = _watched(original)  # type: ignore[attr-defined]
        _active = self

    def uninstall(self) -> None:
        global _active
        for cls, original in reversed(self._originals):
            if original is None:
                del cls.run_forever
            else:
                cls.run_forever = original
        self._originals.clear()
        if _active is self:
            _active = None

    def settings(self, threshold: float) -> Settings:
        settings = self._settings.get(threshold)
        if settings is None:
            settings = Settings(
                threshold=threshold,
                interval=min(Settings.interval, threshold / 4),
                long_stall=max(Settings.long_stall, threshold * 2),
                sources={"threshold": "pytest plugin", "interval": "pytest plugin"},
            )
            settings.validate()
            self._settings[threshold] = settings
        return settings

    # a loop starts and stops running (on the loop's thread) ----------------------------

    def enter(self, loop: asyncio.AbstractEventLoop) -> _Watch:
        from loopwatch.monitor import Monitor

        owner = self._context
        threshold = owner.threshold if owner is not None else self.threshold
        monitor = Monitor.for_loop(loop, self.settings(threshold))
        own = not monitor.running
        watch = _Watch(self, monitor, owner, own)
        monitor.add_callback(watch.on_stall)
        monitor.add_busy_sink(watch.on_busy)
        monitor.acquire(watch)
        with self._lock:
            self._live.add(watch)
        return watch

    def leave(self, watch: _Watch) -> None:
        monitor = watch.monitor
        try:
            if watch.own:
                # The core's users (a LoopWatchMiddleware) stay registered between runs, but a
                # loop that does not run would look blocked: stop it until the next run.
                # Stopping books the loop time measured last, to this run's test.
                monitor.stop(flush=True)
            else:
                monitor.flush_loop_time()
                monitor.release(watch)
                monitor.remove_callback(watch.on_stall)
        finally:
            monitor.remove_busy_sink(watch.on_busy)
            with self._lock:
                self._live.discard(watch)

    def settle(self, timeout: float = SETTLE_SECONDS) -> None:
        """Wait (bounded) until the loops in other threads whose stalls are charged to the
        running test have reported what blocked them so far, so a stall lands in the phase
        during which it happened. Loops owned by wider fixtures or other tests are not waited
        for: their stalls go to the end of the run whenever they arrive."""
        deadline = time.monotonic() + timeout
        for watch in self.settling():
            # the loop time booked so far is the phase's (the watchdog books it every 0.25 s)
            watch.monitor.flush_loop_time()
            if watch.quiet():
                continue
            left = deadline - time.monotonic()
            if left <= 0 or not watch.settle(left):
                return

    def settling(self) -> list[_Watch]:
        """The live watches a phase end has to settle."""
        now = self._context
        with self._lock:
            return [w for w in self._live if not w.on_main and self._charges_to_test(w, now)]

    @staticmethod
    def _charges_to_test(watch: _Watch, now: _Context | None) -> bool:
        """A loop in another thread belongs to the running test (so its stalls are charged to
        the test's current phase) if it started during that test, outside wider fixtures."""
        owner = watch.owner
        return (
            owner is not None
            and now is not None
            and owner.nodeid == now.nodeid
            and owner.fixture_scope in (None, "function")
        )

    # charging stalls (watchdog thread, or the loop's thread) ---------------------------

    def open_window(self) -> list[float]:
        window = [time.time(), math.inf]
        with self._lock:
            self._windows.append(window)
        return window

    def _uncovered(self, start: float, end: float) -> float:
        """Seconds of [start, end] outside every allow_blocking() window."""
        with self._lock:
            spans = sorted((max(a, start), min(b, end)) for a, b in self._windows)
        covered, reach = 0.0, start
        for a, b in spans:
            a = max(a, reach)
            if b > a:
                covered += b - a
                reach = b
        return (end - start) - covered

    def charge(self, watch: _Watch, stall: Stall) -> None:
        owner, now = watch.owner, self._context
        if watch.on_main:
            context = owner  # a loop on pytest's thread runs within one phase
        elif self._charges_to_test(watch, now):
            context = now
        else:
            context = None
        threshold = context.threshold if context is not None else self.threshold
        if stall.duration < threshold:
            verdict = "below-threshold"
        elif (context is not None and context.allow) or self._uncovered(
            stall.started_at, stall.started_at + stall.duration
        ) < threshold:
            verdict = "allowed"
        else:
            verdict = "failed"
        record = _Record(
            stall, context, watch.thread_name, watch.owner_text(), threshold, verdict, self.worker
        )
        with self._lock:
            self.records.append(record)

    def charge_busy(self, watch: _Watch, key: tuple[str, str], seconds: float) -> None:
        """Loop time booked by a watched loop's monitor, to the test that owns it (as
        stalls are charged); time of loops owned by no test is not counted."""
        if watch.on_main:
            context = watch.owner
        elif self._charges_to_test(watch, self._context):
            context = self._context
        else:
            return
        if context is None:
            return
        method, route = key
        label = f"{method} {route}" if method != "-" else route
        with self._lock:
            routes = self.loop_time.setdefault(context.nodeid, {})
            routes[label] = routes.get(label, 0.0) + seconds

    def _failures(self, nodeid: str, phase: str) -> list[_Record]:
        with self._lock:
            return [
                r
                for r in self.records
                if r.verdict == "failed"
                and r.context is not None
                and r.context.nodeid == nodeid
                and r.context.phase == phase
            ]

    # pytest hooks ----------------------------------------------------------------------

    def pytest_report_header(self) -> str:
        return (
            f"loopwatch: tests fail when they block the event loop for {self.threshold:g}s "
            f"or more (threshold from {self.threshold_source})"
        )

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, object, object]:
        self._item_threshold, self._item_allow, self._item_error = self.threshold, False, None
        with self._lock:
            self.loop_time.setdefault(item.nodeid, {})
        marker = item.get_closest_marker("loopwatch")
        if marker is not None:
            try:
                self._item_threshold, self._item_allow = self._read_marker(item, marker)
            except ConfigError as error:
                self._item_error = error
        try:
            return (yield)
        finally:
            self._context = None

    def _read_marker(self, item: pytest.Item, marker: pytest.Mark) -> tuple[float, bool]:
        source = f"@pytest.mark.loopwatch on {item.nodeid}"
        if marker.args:
            raise ConfigError(
                "loopwatch", marker.args, source, "keyword arguments threshold=, allow="
            )
        unknown = sorted(set(marker.kwargs) - {"threshold", "allow"})
        if unknown:
            raise ConfigError(unknown[0], marker.kwargs[unknown[0]], source, "threshold= or allow=")
        threshold = self.threshold
        if marker.kwargs.get("threshold") is not None:
            threshold = _parse_seconds(marker.kwargs["threshold"], source)
            self.settings(threshold)  # the interval must fit below it
        allow = marker.kwargs.get("allow", False)
        if not isinstance(allow, bool):
            raise ConfigError("allow", allow, source, "True or False")
        return threshold, allow

    def _enter_phase(self, item: pytest.Item, phase: str) -> None:
        self._fixtures.clear()
        self._context = _Context(
            item.nodeid, phase, None, None, self._item_threshold, self._item_allow
        )

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, None, None]:
        self._enter_phase(item, "setup")
        if self._item_error is not None:
            pytest.fail(str(self._item_error), pytrace=False)
        try:
            return (yield)
        finally:
            self.settle()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        self._enter_phase(item, "call")
        try:
            return (yield)
        finally:
            self.settle()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, None, None]:
        self._enter_phase(item, "teardown")
        try:
            return (yield)
        finally:
            self.settle()

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(
        self, fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
    ) -> Generator[None, object, object]:
        context = self._context
        if context is None:
            return (yield)
        self._fixtures.append((fixturedef.argname, fixturedef.scope))
        self._context = _Context(
            context.nodeid,
            context.phase,
            fixturedef.argname,
            fixturedef.scope,
            context.threshold,
            context.allow,
        )
        try:
            result = yield
        finally:
            self._fixtures.pop()
            name, scope = self._fixtures[-1] if self._fixtures else (None, None)
            self._context = _Context(
                context.nodeid, context.phase, name, scope, context.threshold, context.allow
            )
        # Finalizers run last-in first-out: this one runs just before the fixture's own
        # teardown (registered during its setup), and after the teardown of the fixtures that
        # depend on it (registered on it when they were set up, later).
        fixturedef.addfinalizer(functools.partial(self._tearing_down, fixturedef))
        return result

    def _tearing_down(self, fixturedef: pytest.FixtureDef[Any]) -> None:
        context = self._context
        if context is not None:
            self._context = replace(
                context, fixture=fixturedef.argname, fixture_scope=fixturedef.scope
            )

    def pytest_fixture_post_finalizer(self, fixturedef: pytest.FixtureDef[Any]) -> None:
        """The fixture's teardown is over (pytest calls this once its finalizers ran)."""
        context = self._context
        if context is not None and context.fixture == fixturedef.argname:
            self._context = replace(context, fixture=None, fixture_scope=None)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        failures = self._failures(item.nodeid, call.when)
        if not failures:
            return report
        self._failed_nodeids.add(item.nodeid)
        failure = _StallFailure(failures)
        if report.failed:
            report.sections.append(
                (f"loopwatch: event loop blocked during {call.when}", str(failure))
            )
        else:
            report.outcome = "failed"
            report.longrepr = failure  # type: ignore[assignment]
        return report

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.settle()
        if self.worker is not None:
            # xdist sends workeroutput to the controller after every sessionfinish impl ran
            workeroutput: dict[str, Any] = self.config.workeroutput  # type: ignore[attr-defined]
            workeroutput[_WORKEROUTPUT_KEY] = self._remote_stalls().as_message()
            return
        if self._stray_count() and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if self.report_path is not None:
            self._write_report()

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        """pytest-xdist, on the controller: a worker finished and sent its stalls."""
        output = getattr(node, "workeroutput", None) or {}
        message = output.get(_WORKEROUTPUT_KEY)
        if message is not None:
            self._remote.append(_RemoteStalls.from_message(message))

    def _remote_stalls(self) -> _RemoteStalls:
        """This process's stalls, in the form a worker sends them."""
        with self._lock:
            records = list(self.records)
        return _RemoteStalls(
            stalls=[record.as_dict() for record in records],
            stray=[
                record.lines()
                for record in records
                if record.context is None and record.verdict == "failed"
            ],
            failed_tests=sorted(self._failed_nodeids),
            loop_time={nodeid: dict(routes) for nodeid, routes in self.loop_time.items()},
        )

    def _all_stalls(self) -> _RemoteStalls:
        """Every stall of the run: this process's and, on an xdist controller, the workers'."""
        combined = self._remote_stalls()
        for remote in self._remote:
            combined.stalls.extend(remote.stalls)
            combined.stray.extend(remote.stray)
            combined.failed_tests.extend(remote.failed_tests)
            combined.loop_time.update(remote.loop_time)
        combined.failed_tests.sort()
        return combined

    def _stray_count(self) -> int:
        return len(self._all_stalls().stray)

    def _write_report(self) -> None:
        assert self.report_path is not None
        everything = self._all_stalls()
        counts = {v: 0 for v in ("failed", "allowed", "below-threshold")}
        for stall in everything.stalls:
            counts[str(stall["verdict"])] += 1
        from loopwatch.version import __version__

        document = {
            "version": REPORT_VERSION,
            "loopwatch": __version__,
            "threshold": self.threshold,
            "summary": {"stalls": len(everything.stalls), **counts},
            "failed_tests": everything.failed_tests,
            "stalls": everything.stalls,
            "tests": {
                nodeid: _test_loop_time(routes)
                for nodeid, routes in sorted(everything.loop_time.items())
            },
        }
        directory = os.path.dirname(os.path.abspath(self.report_path))
        os.makedirs(directory, exist_ok=True)
        with open(self.report_path, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=2)
            out.write("\n")

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        everything = self._all_stalls()
        stalls = everything.stalls
        failed = sum(s["verdict"] == "failed" for s in stalls)
        allowed = sum(s["verdict"] == "allowed" for s in stalls)
        if not stalls and self.report_path is None:
            return
        terminalreporter.section("loopwatch", sep="-")
        terminalreporter.line(
            f"{len(stalls)} stall(s) past {self.threshold:g}s: {failed} failed, {allowed} allowed"
        )
        if everything.stray:
            terminalreporter.line(
                "blocking in loops not owned by the running test (this fails the run):", red=True
            )
            for lines in everything.stray:
                for line in lines:
                    terminalreporter.line(line)
        if self.report_path is not None:
            terminalreporter.line(f"report written to {self.report_path}")


_WORKEROUTPUT_KEY = "loopwatch"


@dataclass
class _RemoteStalls:
    """The stalls of one process as plain data (what an xdist worker sends the controller):
    each as its report entry, the printed lines of those that fail the run, the failed tests."""

    stalls: list[dict[str, object]]
    stray: list[list[str]]
    failed_tests: list[str]
    loop_time: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_message(self) -> dict[str, object]:
        return {
            "stalls": self.stalls,
            "stray": self.stray,
            "failed_tests": self.failed_tests,
            "loop_time": self.loop_time,
        }

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> _RemoteStalls:
        return cls(
            stalls=list(message.get("stalls", [])),
            stray=[list(lines) for lines in message.get("stray", [])],
            failed_tests=list(message.get("failed_tests", [])),
            loop_time={
                str(nodeid): {str(k): float(v) for k, v in routes.items()}
                for nodeid, routes in message.get("loop_time", {}).items()
            },
        )


_PLACEHOLDERS = (BACKGROUND, SERVER)


def _test_loop_time(routes: dict[str, float]) -> dict[str, object]:
    """One test's entry in the report: its loop busy seconds (every loop it owned, all
    phases) and the route that took most of them. Placeholders (``<background>``: the test's
    own code and its client, ``<server>``) are the top route only when no request took any."""
    top = max(
        routes,
        key=lambda label: (label not in _PLACEHOLDERS, routes[label], label),
        default=None,
    )
    return {
        "loop_busy_seconds": round(float(sum(routes.values())), 6),
        "top_route": top,
        "top_route_seconds": round(routes[top], 6) if top is not None else None,
        "routes": {
            label: round(seconds, 6)
            for label, seconds in sorted(routes.items(), key=lambda kv: (-kv[1], kv[0]))
        },
    }


# -- private helpers around the core monitor -------------------------------------------


def _watched(original: Callable[..., Any]) -> Callable[..., Any]:
    import asyncio

    @functools.wraps(original)
    def run_forever(self: asyncio.AbstractEventLoop) -> Any:
        guard = _active
        # A nested or invalid call raises in the original: leave it alone.
        if (
            guard is None
            or self.is_running()
            or self.is_closed()
            or asyncio._get_running_loop() is not None
        ):
            return original(self)
        watch = guard.enter(self)
        try:
            return original(self)
        finally:
            guard.leave(watch)

    run_forever.__loopwatch__ = True  # type: ignore[attr-defined]
    return run_forever
