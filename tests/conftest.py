from __future__ import annotations

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
