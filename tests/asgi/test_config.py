"""Bad configuration fails at construction with the option, the value, its source and what fits."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from loopwatch import ConfigError, LoopWatchMiddleware, Settings
from tests.serving import free_port, serve_process, server_output


async def _app(scope: object, receive: object, send: object) -> None:
    pass


@pytest.mark.parametrize(
    ("options", "option", "expected"),
    [
        ({"threshold": -1}, "threshold", "above 0"),
        ({"threshold": 0}, "threshold", "above 0"),
        ({"threshold": float("nan")}, "threshold", "finite"),
        ({"threshold": "fast"}, "threshold", "number of seconds"),
        ({"interval": 0}, "interval", "above 0"),
        ({"interval": 0.2}, "interval", "at most threshold/3"),
        ({"threshold": 0.05, "interval": 0.05}, "interval", "0.01667 for threshold=0.05"),
        ({"threshold": 0.1, "interval": 0.05}, "interval", "at most threshold/3 (0.03333"),
        ({"metrics_port": 70000}, "metrics_port", "1 to 65535"),
        ({"metrics_port": -5}, "metrics_port", "1 to 65535"),
        ({"metrics_port": True}, "metrics_port", "1 to 65535"),
        ({"metrics_host": "not a host!"}, "metrics_host", "IP address or host name"),
        ({"request_metrics": "yes"}, "request_metrics", "True or False"),
        ({"loop_time": 1}, "loop_time", "True or False"),
        ({"profile": "on"}, "profile", "True or False"),
        ({"exclude": ["metrics"]}, "exclude", "starting with '/'"),
        ({"long_stall": 0.05}, "long_stall", "above threshold"),
        ({"on_stall": "print"}, "on_stall", "callable"),
        ({"registry": object()}, "registry", "CollectorRegistry"),
    ],
)
def test_bad_arguments_name_option_value_and_expectation(
    options: dict[str, object], option: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        LoopWatchMiddleware(_app, **options)  # type: ignore[arg-type]
    err = caught.value
    assert isinstance(err, ValueError)
    assert err.option == option
    assert f"invalid {option}=" in str(err)
    assert "(from argument)" in str(err)
    assert expected in str(err)


@pytest.mark.parametrize(
    ("var", "text", "option"),
    [
        ("LOOPWATCH_THRESHOLD", "abc", "threshold"),
        ("LOOPWATCH_THRESHOLD", "-0.5", "threshold"),
        ("LOOPWATCH_INTERVAL", "1s", "interval"),
        ("LOOPWATCH_METRICS_PORT", "http", "metrics_port"),
        ("LOOPWATCH_METRICS_PORT", "99999", "metrics_port"),
        ("LOOPWATCH_REQUEST_METRICS", "maybe", "request_metrics"),
        ("LOOPWATCH_LOOP_TIME", "sometimes", "loop_time"),
        ("LOOPWATCH_PROFILE", "later", "profile"),
    ],
)
def test_bad_environment_values_name_the_variable(var: str, text: str, option: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.resolve(env={var: text})
    assert caught.value.option == option
    assert f"environment variable {var}" in str(caught.value)
    assert text in str(caught.value)


def test_environment_fills_in_and_explicit_arguments_win() -> None:
    env = {
        "LOOPWATCH_THRESHOLD": "0.25",
        "LOOPWATCH_INTERVAL": "0.02",
        "LOOPWATCH_METRICS_PORT": "9123",
        "LOOPWATCH_REQUEST_METRICS": "off",
        "LOOPWATCH_EXCLUDE": "/metrics, /health",
        "LOOPWATCH_LOOP_TIME": "0",
        "LOOPWATCH_PROFILE": "no",
    }
    settings = Settings.resolve(env=env)
    assert (settings.threshold, settings.interval, settings.metrics_port) == (0.25, 0.02, 9123)
    assert settings.request_metrics is False
    assert settings.exclude == ("/metrics", "/health")
    assert settings.loop_time is False
    assert settings.profile is False
    assert settings.source("threshold") == "environment variable LOOPWATCH_THRESHOLD"
    explicit = Settings.resolve(env=env, threshold=0.5, request_metrics=True)
    assert explicit.threshold == 0.5 and explicit.request_metrics is True
    assert explicit.source("threshold") == "argument"


def test_a_low_threshold_brings_the_default_interval_down_with_it() -> None:
    assert Settings.resolve(env={}, threshold=0.015).interval == pytest.approx(0.005)
    assert Settings.resolve(env={"LOOPWATCH_THRESHOLD": "0.6"}).interval == 0.01
    # an interval given is never changed, only checked
    assert Settings.resolve(env={}, threshold=0.3, interval=0.1).interval == 0.1


def test_defaults() -> None:
    settings = Settings.resolve(env={})
    assert (settings.threshold, settings.interval) == (0.1, 0.01)
    assert settings.metrics_port is None and settings.metrics_host == "127.0.0.1"
    assert settings.request_metrics is True and settings.exclude == ("/metrics",)
    assert settings.loop_time is True
    assert settings.profile is True


def test_bad_config_fails_app_start_up_not_the_first_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LOOPWATCH_THRESHOLD", "soon")
    app = FastAPI()
    app.add_middleware(LoopWatchMiddleware)
    with pytest.raises(ConfigError, match="LOOPWATCH_THRESHOLD"), TestClient(app):
        pass  # the lifespan start-up builds the middleware stack and fails there


def test_a_busy_metrics_port_is_a_config_error() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"invalid metrics_port={port}.*free to bind"):
            LoopWatchMiddleware(_app, metrics_port=port)  # type: ignore[arg-type]


QUICKSTART = """
from fastapi import FastAPI
from loopwatch import LoopWatchMiddleware, metrics_app

app = FastAPI()
app.add_middleware(LoopWatchMiddleware)
app.mount("/metrics", metrics_app())


@app.get("/")
async def root() -> dict[str, bool]:
    return {"ok": True}
"""


@contextlib.contextmanager
def bad_option(option: str) -> Iterator[tuple[dict[str, str], str]]:
    """The environment of a deploy with one bad option, and what its error must name."""
    if option == "threshold":
        yield {"LOOPWATCH_THRESHOLD": "abc"}, "invalid threshold='abc' (from environment variable"
        return
    with socket.socket() as busy:  # a second worker with a fixed side port, say
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        yield {"LOOPWATCH_METRICS_PORT": str(port)}, f"invalid metrics_port={port}"


@pytest.mark.parametrize("option", ["threshold", "metrics_port"])
def test_a_bad_option_fails_uvicorn_start_up_under_its_default_lifespan(
    tmp_path: Path, loop_impl: str, option: str
) -> None:
    (tmp_path / "quickstart.py").write_text(QUICKSTART)
    with bad_option(option) as (env, named):
        done = subprocess.run(
            [sys.executable, "-m", "uvicorn", "quickstart:app", "--app-dir", str(tmp_path),
             "--host", "127.0.0.1", "--port", str(free_port()), "--loop", loop_impl],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert named in output
    assert "Application startup failed" in output
    assert "lifespan' protocol appears unsupported" not in output


def test_with_lifespan_off_a_bad_option_fails_every_request_naming_it(tmp_path: Path) -> None:
    (tmp_path / "quickstart.py").write_text(QUICKSTART)
    with serve_process(
        "quickstart:app",
        args=("--app-dir", str(tmp_path), "--lifespan", "off"),
        env={"LOOPWATCH_THRESHOLD": "abc"},
    ) as (url, proc):
        assert [httpx.get(url + "/").status_code for _ in range(3)] == [500] * 3
        output = server_output(proc)
    assert output.count("invalid threshold='abc'") >= 3  # never served as if nothing were wrong


def test_a_side_port_taken_between_two_lifespans_fails_the_second_start_up() -> None:
    port = free_port()
    seen = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        seen.append("app start-up")
        yield

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(LoopWatchMiddleware, metrics_port=port)
    with TestClient(app):
        pass  # the side port is released at shutdown
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(ConfigError, match=f"invalid metrics_port={port}"), TestClient(app):
            pass
    assert seen == ["app start-up"]  # the app's own start-up did not run the second time
