"""The README's screenshot of the live page: the demo app under load, its side port's page in
headless Chromium (Debian's ``chromium``, driven by Playwright), taken while a stall lasts.

    .venv/bin/python scripts/screenshot_ui.py [--out docs/live-page.png] [--seconds 40]

Only 127.0.0.1: the demo app in a subprocess, its load from this process."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.serving import free_port, stop_process, wait_until_up  # noqa: E402

# (method, path, weight): mostly healthy traffic, some fake-async endpoints that block
LOAD = [
    ("GET", "/async-sleep", 12),
    ("GET", "/sync", 8),
    ("GET", "/mixed-fast", 6),
    ("GET", "/async", 1),
    ("POST", "/mixed", 2),
    ("GET", "/cpu", 2),
]


def drive(base: str, stop: threading.Event) -> None:
    choices = [(m, p) for m, p, w in LOAD for _ in range(w)]
    with httpx.Client(base_url=base, timeout=30) as client:
        while not stop.is_set():
            method, path = random.choice(choices)
            client.request(method, path)
            stop.wait(random.uniform(0.1, 0.8))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "docs" / "live-page.png"))
    parser.add_argument("--seconds", type=float, default=40.0, help="seconds of load first")
    args = parser.parse_args()
    from playwright.sync_api import expect, sync_playwright

    port, side = free_port(), free_port()
    env = {
        **os.environ,
        "DEMO_WORK_SECONDS": "0.3",
        "LOOPWATCH_METRICS_PORT": str(side),
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "uvicorn", "demo_app.main:app", "--port", str(port),
               "--log-level", "error", "--no-access-log"]  # fmt: skip
    proc = subprocess.Popen(command, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    try:
        wait_until_up(base + "/metrics", proc)
        random.seed(14)
        drivers = [threading.Thread(target=drive, args=(base, stop)) for _ in range(3)]
        for t in drivers:
            t.start()
        time.sleep(args.seconds)
        with sync_playwright() as playwright:
            chromium = os.environ.get("LOOPWATCH_CHROMIUM") or shutil.which("chromium")
            browser = playwright.chromium.launch(executable_path=chromium)
            page = browser.new_page(viewport={"width": 1100, "height": 1180})
            page.goto(f"http://127.0.0.1:{side}/")
            page.locator("#profile-route").wait_for(state="attached")
            time.sleep(3)  # a few polls: table, stalls, profile
            page.locator("#span").select_option("60")
            # a fresh freeze, shot while the page shows it (a 0.3 s stall can fall between
            # two polls of the page: try again)
            for _ in range(20):
                threading.Thread(target=httpx.get, args=(base + "/cpu",), daemon=True).start()
                try:
                    expect(page.locator("#state-word")).to_have_text("BLOCKED", timeout=500)
                    break
                except AssertionError:
                    time.sleep(0.5)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out)
            browser.close()
    finally:
        stop.set()
        stop_process(proc)
    print(f"{args.out}: {Path(args.out).stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
