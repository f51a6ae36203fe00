"""The release: ``python -m build`` and ``twine check --strict`` pass, the wheel carries the
live page's files, and the README's Quickstart runs against the wheel installed in a fresh
venv (no checkout on its path), with and without a code change."""

from __future__ import annotations

import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.helpers import eventually
from tests.serving import free_port, serve_command

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
QUICKSTART = re.compile(r"## Quickstart\n(.*?)\n## ", re.DOTALL)
SAMPLE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def installed(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel and what the Quickstart's app needs, from PyPI."""
    home = tmp_path_factory.mktemp("venv")
    venv.create(home, with_pip=True)
    [wheel] = dist.glob("*.whl")
    subprocess.run(
        [str(home / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel),
         "fastapi", "uvicorn"],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    return home


def test_the_release_passes_twine_and_carries_the_page(dist: Path) -> None:
    files = sorted(dist.iterdir())
    assert sorted(f.suffix for f in files) == [".gz", ".whl"], files
    done = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    with zipfile.ZipFile(next(f for f in files if f.suffix == ".whl")) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(next(n for n in names if n.endswith("METADATA"))).decode()
    for asset in ("ui/index.html", "ui/app.js", "ui/style.css", "py.typed"):
        assert f"loopwatch/{asset}" in names, asset
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert "Project-URL: Changelog" in metadata and "License-Expression: MIT" in metadata


def _app_dir(tmp_path: Path, code_change: bool) -> Path:
    """The README's Quickstart app; with the code change, its two lines (and their import)
    added at the end of it, as a user adds them to an app of their own."""
    section = QUICKSTART.search(README.read_text())
    assert section is not None, "the README's Quickstart"
    app_source, lines = SAMPLE.findall(section.group(1))
    assert "loopwatch" not in app_source.lower()  # the app itself knows nothing of it
    if code_change:
        added = [ln for ln in lines.splitlines() if "loopwatch" in ln.lower() or "app." in ln]
        assert len(added) == 3, added  # the import and the two lines
        app_source += "\n" + "\n".join(added) + "\n"
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.py").write_text(app_source)
    return app


def _stalls(text: str) -> dict[str, float]:
    found = re.findall(
        r'^loopwatch_stalls_total\{method="GET",route="([^"]+)"\} (\S+)$', text, re.M
    )
    return {route: float(value) for route, value in found}


@pytest.mark.parametrize("code_change", [True, False], ids=["middleware", "loopwatch-run"])
def test_the_quickstart_runs_against_the_installed_wheel(
    installed: Path, tmp_path: Path, code_change: bool
) -> None:
    app = _app_dir(tmp_path, code_change)
    port, side = free_port(), free_port()
    uvicorn = [str(installed / "bin" / "uvicorn"), "app:app", "--port", str(port)]
    command = uvicorn if code_change else [
        str(installed / "bin" / "loopwatch"), "run", "--metrics-port", str(side), "--", *uvicorn
    ]  # fmt: skip
    metrics = (
        f"http://127.0.0.1:{port}/metrics" if code_change else f"http://127.0.0.1:{side}/metrics"
    )
    # the fresh venv's own interpreter, in the app's directory: no checkout on its path
    with serve_command(command, port, {"PYTHONPATH": ""}, cwd=app) as (url, proc):
        assert httpx.get(f"{url}/fine", timeout=10).status_code == 200
        assert httpx.get(f"{url}/blocking", timeout=10).status_code == 200
        eventually(lambda: _stalls(httpx.get(metrics, timeout=5).text).get("/blocking") == 1.0,
                   timeout=10, what="the /blocking stall")  # fmt: skip
        stalls = _stalls(httpx.get(metrics, timeout=5).text)
        log = Path(proc.output_path).read_text()  # type: ignore[attr-defined]
        where = subprocess.run(
            [str(installed / "bin" / "python"), "-c", "import loopwatch; print(loopwatch.__file__)"],
            cwd=app, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    # the blocking route, once; the innocent one declared at 0 (every route is, from start-up)
    assert {route: n for route, n in stalls.items() if n} == {"/blocking": 1.0}, stalls
    assert stalls["/fine"] == 0.0, stalls
    assert str(installed) in where and str(ROOT) not in where, where
    # the README's log line: the route, the kind, the sample's own line
    sleep = 1 + next(
        n
        for n, text in enumerate((app / "app.py").read_text().splitlines())
        if "time.sleep" in text
    )  # the README's log line says the same
    line = f"by GET /blocking (wait) at {app / 'app.py'}:{sleep} in blocking; "
    assert "event loop blocked for 0.5" in log and line in log, log
    assert f"by GET /blocking (wait) at /srv/app.py:{sleep} in blocking; " in README.read_text()
