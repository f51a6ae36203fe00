"""The harness behind ``make test-starlette``: its pytest plugin really wraps the apps that
reach a client, and the comparison counts a test failing only when wrapped."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest_plugins = ["pytester"]

SCRIPTS = Path(__file__).resolve().parent.parent.parent / "scripts"

# Each app answers whether LoopWatchMiddleware saw the request (it marks the scope): "False"
# bare. Two tests assert "False", so they fail when wrapped; the ASGI2 one only needs a 200.
SUITE = """
import importlib

import pytest
from starlette.testclient import TestClient


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str("loopwatch" in scope).encode()})


class ASGI2App:
    def __init__(self, scope):
        self.scope = scope

    async def __call__(self, receive, send):
        await app(self.scope, receive, send)


def test_testclient():
    assert TestClient(app).get("/").text == "False"


def test_testclient_asgi2():
    assert TestClient(ASGI2App).get("/").status_code == 200


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_transport(anyio_backend):
    seen = []
    for name in ("httpx", "httpx2"):
        module = importlib.import_module(name)
        transport = module.ASGITransport(app=app)
        async with module.AsyncClient(transport=transport, base_url="http://t") as client:
            seen.append((await client.get("/")).text)
    assert seen == ["False", "False"]
"""


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def harness() -> ModuleType:
    pytest.importorskip("starlette.testclient")
    pytest.importorskip("httpx2")
    return _load("starlette_suite")


def _run(pytester: pytest.Pytester, *args: str) -> Path:
    report = pytester.path / f"report{len(list(pytester.path.glob('*.xml')))}.xml"
    pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "no:asyncio", "-p", "no:loopwatch",
        "-p", "starlette_wrap", f"--junitxml={report}", *args,
    )  # fmt: skip
    return report


def test_wrapped_run_fails_where_bare_passes(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, harness: ModuleType
) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SCRIPTS), *sys.path]))
    pytester.makepyfile(test_app=SUITE)

    bare = harness.read_junit(_run(pytester))
    wrapped = harness.read_junit(_run(pytester, "--loopwatch-wrap"))

    ids = ["test_app.py::test_testclient", "test_app.py::test_testclient_asgi2",
           "test_app.py::test_transport[asyncio]"]  # fmt: skip
    assert sorted(bare) == sorted(wrapped) == ids
    assert {i: o.outcome for i, o in bare.items()} == dict.fromkeys(ids, "passed")
    assert {i: o.outcome for i, o in wrapped.items()} == {
        ids[0]: "failed",
        ids[1]: "passed",
        ids[2]: "failed",
    }
    assert [bare[i].apps_wrapped for i in ids] == [0, 0, 0]
    assert [wrapped[i].apps_wrapped for i in ids] == [1, 1, 2]  # httpx and httpx2
    assert [wrapped[i].backend for i in ids] == ["none", "none", "asyncio"]
    assert "'True' == 'False'" in wrapped[ids[0]].message
    assert "['True', 'True'] == ['False', 'False']" in wrapped[ids[2]].message

    regressions = harness.compare(
        harness.RunResult("bare", 0.0, 0, bare), harness.RunResult("wrapped", 0.0, 1, wrapped), 8
    )
    assert regressions == 2
