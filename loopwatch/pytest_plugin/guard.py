"""The hooks that exist only while the plugin is on: which test, phase and fixture runs now,
each phase's verdict on its report, and the end of the run (xdist, the JSON report, the
summary)."""

from __future__ import annotations

import functools
from collections.abc import Generator
from dataclasses import replace
from typing import Any

import pytest

from loopwatch.config import ConfigError
from loopwatch.pytest_plugin.charges import Charges
from loopwatch.pytest_plugin.loops import LoopRuns, Watch
from loopwatch.pytest_plugin.options import Options, read_marker
from loopwatch.pytest_plugin.records import Context, StallFailure
from loopwatch.pytest_plugin.report import (
    WORKEROUTPUT_KEY,
    RemoteStalls,
    combine,
    from_records,
    terminal_summary,
    write_report,
)

__all__ = ["Guard"]


class Guard:
    def __init__(self, config: pytest.Config, options: Options) -> None:
        self.config = config
        self.threshold = options.threshold
        self.threshold_source = options.threshold_source
        self.report_path = options.report
        # pytest-xdist: a worker sends its stalls to the controller, which lists and reports
        # them with its own (it runs no test, so these are all the run's stalls)
        workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
        self.worker: str | None = workerinput["workerid"] if workerinput is not None else None
        self._remote: list[RemoteStalls] = []
        self._context: Context | None = None
        self._item_threshold = self.threshold
        self._item_allow = False
        self._item_error: ConfigError | None = None
        self._fixtures: list[tuple[str, str]] = []
        self.charges = Charges(self.threshold, self.worker, lambda: self._context, options.gc_fails)
        self.runs = LoopRuns(
            self.threshold, lambda: self._context, self.charges.charge, self.charges.charge_busy
        )

    def install(self) -> None:
        self.runs.install()

    def uninstall(self) -> None:
        self.runs.uninstall()

    def settling(self) -> list[Watch]:
        """The loops a phase end waits for now (those of the running test, other threads)."""
        return self.runs.settling()

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
        self.charges.test_started(item.nodeid)
        marker = item.get_closest_marker("loopwatch")
        if marker is not None:
            try:
                self._item_threshold, self._item_allow = read_marker(item, marker, self.threshold)
            except ConfigError as error:
                self._item_error = error
        try:
            return (yield)
        finally:
            self._context = None

    def _enter_phase(self, item: pytest.Item, phase: str) -> None:
        self._fixtures.clear()
        self._context = Context(
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
            self.runs.settle()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        self._enter_phase(item, "call")
        try:
            return (yield)
        finally:
            self.runs.settle()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, None, None]:
        self._enter_phase(item, "teardown")
        try:
            return (yield)
        finally:
            self.runs.settle()

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(
        self, fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
    ) -> Generator[None, object, object]:
        context = self._context
        if context is None:
            return (yield)
        self._fixtures.append((fixturedef.argname, fixturedef.scope))
        self._context = replace(context, fixture=fixturedef.argname, fixture_scope=fixturedef.scope)
        try:
            result = yield
        finally:
            self._fixtures.pop()
            name, scope = self._fixtures[-1] if self._fixtures else (None, None)
            self._context = replace(context, fixture=name, fixture_scope=scope)
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
        failures = self.charges.failures(item.nodeid, call.when)
        if not failures:
            return report
        failure = StallFailure(failures)
        if report.failed:
            report.sections.append(
                (f"loopwatch: event loop blocked during {call.when}", str(failure))
            )
        else:
            report.outcome = "failed"
            report.longrepr = failure  # type: ignore[assignment]
        return report

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.runs.settle()
        if self.worker is not None:
            # xdist sends workeroutput to the controller after every sessionfinish impl ran
            workeroutput: dict[str, Any] = self.config.workeroutput  # type: ignore[attr-defined]
            workeroutput[WORKEROUTPUT_KEY] = self._mine().as_message()
            return
        if self._all_stalls().stray and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if self.report_path is not None:
            write_report(self.report_path, self.threshold, self._all_stalls())

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        """pytest-xdist, on the controller: a worker finished and sent its stalls."""
        output = getattr(node, "workeroutput", None) or {}
        message = output.get(WORKEROUTPUT_KEY)
        if message is not None:
            self._remote.append(RemoteStalls.from_message(message))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminal_summary(terminalreporter, self._all_stalls(), self.threshold, self.report_path)

    def _mine(self) -> RemoteStalls:
        return from_records(*self.charges.snapshot())

    def _all_stalls(self) -> RemoteStalls:
        return combine(self._mine(), self._remote)
