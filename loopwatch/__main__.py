"""``python -m loopwatch``: the same command line as the ``loopwatch`` script."""

from __future__ import annotations

from loopwatch.cli import main

raise SystemExit(main())
