"""loopwatch's bootstrap: ``loopwatch run`` puts this directory first on ``PYTHONPATH``, so
every Python process the command starts imports this module at start-up (``site``). It runs
the ``sitecustomize`` it hides, if there is one, then attaches loopwatch (``loopwatch.attach``).
Nothing here may stop the program: a failure is printed once to stderr and the program runs.
"""

from __future__ import annotations

import importlib
import os
import sys


def _run_hidden_sitecustomize() -> None:
    """The ``sitecustomize`` further on the path (a venv's, a distribution's) runs as it would
    have without this one."""
    here = os.path.dirname(os.path.abspath(__file__))
    ours = sys.modules.pop(__name__, None)
    saved = sys.path[:]
    try:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
        importlib.import_module("sitecustomize")
    except ImportError as error:
        if error.name != "sitecustomize":
            raise
    finally:
        sys.path[:] = saved
        if ours is not None:
            sys.modules[__name__] = ours


def _attach() -> None:
    try:
        _run_hidden_sitecustomize()
    except Exception as error:  # the hidden one failed: Python would print it and go on
        print(f"loopwatch: error in sitecustomize: {error!r}", file=sys.stderr)
    try:
        from loopwatch.attach import install
    except ImportError as error:
        print(f"loopwatch: not attached: {sys.executable} cannot import it ({error}); "
              "install loopwatch where COMMAND's Python finds it", file=sys.stderr)  # fmt: skip
        return
    try:
        install()
    except Exception as error:
        print(f"loopwatch: not attached: {error!r}", file=sys.stderr)


_attach()
