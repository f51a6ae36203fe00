"""A real headless Chromium for the live page's tests: Debian's ``chromium`` driven by
Playwright for Python (its pip package, with no browser of its own). Missing, the tests skip;
under ``CI=true`` they fail (``.ci/run`` and ``make test`` install it)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest


def chromium_path() -> str:
    """Debian's Chromium (or ``LOOPWATCH_CHROMIUM``); skip, or fail under CI=true, without."""
    path = (
        os.environ.get("LOOPWATCH_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )
    missing = []
    if path is None:
        missing.append("no 'chromium' on PATH (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("no Playwright for Python (pip install -e '.[test]')")
    if path is not None and not missing:
        return path
    reason = "the live page's browser tests need a headless Chromium: " + "; ".join(missing)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (a Playwright ``Browser``)."""
    from playwright.sync_api import sync_playwright

    path = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Watched:
    """A page and what it did: console errors, uncaught exceptions, every URL it asked for."""

    page: Any
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def foreign_requests(self, origin: str) -> list[str]:
        """Requests to anything but ``origin`` (scheme://host:port), ``data:`` aside."""
        want = urlsplit(origin)
        return [
            url
            for url in self.requests
            if not url.startswith("data:")
            and (urlsplit(url).scheme, urlsplit(url).netloc) != (want.scheme, want.netloc)
        ]


@contextlib.contextmanager
def watched_page(browser: Any, **context: Any) -> Iterator[Watched]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000}, **context)
    page = ctx.new_page()
    seen = Watched(page)
    page.on("console", lambda m: seen.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: seen.errors.append(f"uncaught: {exc}"))
    page.on("request", lambda r: seen.requests.append(r.url))
    try:
        yield seen
    finally:
        ctx.close()
