from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from prometheus_client import CollectorRegistry

from loopwatch import clear_recent_stalls
from tests.serving import LOOPS

if TYPE_CHECKING:
    from tests.otel_sdk import Otel


@pytest.fixture(autouse=True)
def _fresh_stall_ring() -> Iterator[None]:
    clear_recent_stalls()
    yield
    clear_recent_stalls()


@pytest.fixture(autouse=True)
def _default_loop_policy() -> Iterator[None]:
    # uvicorn < 0.36 sets uvloop's event loop policy process-wide for loop="uvloop" and never
    # resets it: a later test's asyncio.new_event_loop() would quietly be a uvloop loop
    yield
    asyncio.set_event_loop_policy(None)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture(params=LOOPS)
def loop_impl(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def otel() -> Iterator[Otel]:
    """A real OpenTelemetry SDK (imported only by the tests that ask for it)."""
    from tests.otel_sdk import Otel

    sdk = Otel()
    yield sdk
    sdk.shutdown()
