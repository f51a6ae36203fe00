"""What the benchmarks that start a server subprocess share: a free port, a GET, waiting
until the server answers."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from typing import IO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, method: str = "GET", timeout: float = 30) -> bytes:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        data: bytes = answer.read()
        return data


def wait_up(url: str, proc: subprocess.Popen[bytes], log: IO[bytes], timeout: float = 30) -> None:
    """Until ``url`` answers; the server's output (``log``) in the error if it never does."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            get(url)
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(log.read().decode(errors="replace")) from None
            time.sleep(0.1)
