from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from loopwatch import clear_recent_stalls
from tests.serving import LOOPS


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
