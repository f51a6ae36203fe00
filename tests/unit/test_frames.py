"""Which code is the application's: an installer's console-script wrapper is not."""

from __future__ import annotations

import os
import pathlib
import sys
import sysconfig
import threading
import time

import pytest
from pip._vendor.distlib.scripts import ScriptMaker

from loopwatch.frames import CodeFilter, is_console_script


def make_wrapper(bin_dir: pathlib.Path, spec: str = "mytool = mypkg.cli:main") -> str:
    """A console script as pip writes it (pip's own distlib ScriptMaker)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    maker = ScriptMaker(None, str(bin_dir), add_launchers=False)
    maker.executable = str(bin_dir / "python")
    maker.variants = {""}
    [path] = maker.make(spec)
    return str(path)


@pytest.fixture
def venv(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "venv"


def test_a_wrapper_in_a_prefix_bin_directory_is_not_app_code(venv: pathlib.Path) -> None:
    wrapper = make_wrapper(venv / "bin")
    app = venv.parent / "app.py"
    app.write_text("async def endpoint():\n    pass\n")
    code = CodeFilter(prefixes=(str(venv),), main="")
    assert not code.is_app(wrapper)
    assert code.is_app(str(app))
    # without that prefix the wrapper is an ordinary file of the project
    assert CodeFilter(prefixes=(), main="").is_app(wrapper)


def test_this_interpreters_own_console_scripts_are_not_app_code() -> None:
    scripts = pathlib.Path(sysconfig.get_path("scripts"))
    pytest_script = scripts / ("pytest.exe" if os.name == "nt" else "pytest")
    assert pytest_script.exists()
    assert not CodeFilter().is_app(str(pytest_script))


def test_the_main_script_is_not_app_code_when_it_is_a_wrapper(tmp_path: pathlib.Path) -> None:
    # a wrapper outside any prefix (pipx, ~/.local/bin): known as sys.argv[0]
    wrapper = make_wrapper(tmp_path / "tools")
    assert is_console_script(wrapper)
    assert not CodeFilter(prefixes=(), main=wrapper).is_app(wrapper)
    script = tmp_path / "serve.py"  # an app's own script run as main is the app's
    script.write_text(
        "import sys\nfrom app import main\n\n\ndef run():\n    main()\n\n\n"
        "if __name__ == '__main__':\n    sys.exit(run())\n"
    )
    assert not is_console_script(str(script))
    assert CodeFilter(prefixes=(), main=str(script)).is_app(str(script))


def test_the_culprit_falls_back_past_a_wrapper(venv: pathlib.Path) -> None:
    """A thread whose only frame outside the standard library is the wrapper's: the culprit
    is the innermost frame, as for any stack without app code, not the wrapper's line."""
    wrapper = make_wrapper(venv / "bin")
    release = threading.Event()
    code = compile("release.wait(30)", wrapper, "exec")
    thread = threading.Thread(target=exec, args=(code, {"release": release}), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while True:
            frame = sys._current_frames().get(thread.ident or 0)
            if frame is not None and frame.f_code.co_name == "wait":
                break
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with_prefix = CodeFilter(prefixes=(str(venv),), main="").culprit(frame)
        without = CodeFilter(prefixes=(), main="").culprit(frame)
    finally:
        release.set()
        thread.join(10)
    assert without is not None and without[0] == wrapper  # what it was before
    assert with_prefix is not None
    assert with_prefix[0] == threading.__file__ and with_prefix[2] == "wait"
