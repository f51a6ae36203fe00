"""The fleet: every worker's loops, stalls and profile, for whichever worker serves the page.

In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) each worker publishes what the others
need into ``<dir>/loopwatch/``, from its watchdog thread (``Publisher.publish`` runs with the
multiprocess mirrors: every 0.1 s while a stall lasts, about once a second otherwise, and at
each stall), never on the loop or the request path:

- ``state-<pid>.json``: its loops now (blocked or not, by which route, at which line, for
  how long), replaced atomically; rewritten at every call while a loop is held or when that
  changes, else at most once a second; removed when its last loop stops;
- ``stalls-<pid>.jsonl``: its stalls, one JSON line each, appended at each stall and cut back
  to the ring's size now and then (replaced atomically);
- ``profile-<pid>.jsonl``: its loop profile's finished seconds, appended about once a second:
  ``{"s": id, "k": [label, frame, ...]}`` names a stack once per file, ``{"t": second,
  "c": [[id, ms], ...]}`` counts one second of ``time.monotonic()`` (one clock for every
  process of a host).

The reader is this module's functions (``workers``, ``stalls``, ``profile``): the worker that
serves the page reads its own figures in memory and every other worker's files. A worker
whose pid is gone, or whose state was not refreshed for ``STALE`` seconds, leaves the loops at
once; its stalls and profile stay ``KEEP_DEAD`` seconds (the profile's window), then its files
are removed. Everything read is checked and cut to size: a torn line or a foreign file is
skipped, never an error.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from loopwatch.profile import KEEP_SECONDS, MAX_DEPTH, PROFILE, ProfileStore, Stack, clean
from loopwatch.stall import RING_SIZE, Stall, recent_stalls
from loopwatch.stats import StatsBook, WatchedLoop

__all__ = [
    "Publisher",
    "Worker",
    "alive",
    "loop_rows",
    "profile",
    "publisher_for",
    "stalls",
    "workers",
]

logger = logging.getLogger("loopwatch")

SUBDIR = "loopwatch"
STALE = 30.0  # seconds without a state refresh: its watchdog is gone (or the pid reused)
KEEP_DEAD = float(KEEP_SECONDS)  # a dead worker's stalls and profile stay this long
HEALTHY_EVERY = 1.0  # seconds between state writes while no loop is held
MAX_TEXT = 300  # characters of a route, method, culprit read from another worker's file
MAX_STACK = 16_000  # characters of a stall's stack
MAX_FILE = 8 << 20  # bytes read of one file
MAX_LOOPS = 16  # loop rows read from one worker


def loop_rows(loops: Iterable[WatchedLoop]) -> list[dict[str, Any]]:
    """Each running loop now: its threshold, requests in flight, and the stall in progress
    (age, owner, the culprit line sampled so far) or None."""
    rows = []
    for loop in loops:
        if not loop.running:
            continue
        age = loop.current_stall_seconds()
        blocked = None
        if age > 0.0:
            live = loop.stall_in_progress()
            method, route = live[0] if live is not None else (None, None)
            if live is not None:
                age = max(age, live[1])
            blocked = {
                "seconds": round(age, 3),
                "method": method,
                "route": route,
                "culprit": loop.hold_culprit(),
            }
        rows.append({"threshold": loop.threshold, "in_flight": loop.in_flight, "blocked": blocked})
    return rows


# -- publishing (each worker's watchdog thread) ---------------------------------------------


class Publisher:
    """Writes one process's loops, stalls and profile for the other workers to read."""

    def __init__(
        self,
        directory: str,
        store: ProfileStore = PROFILE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = os.path.join(directory, SUBDIR)
        self.store = store
        self._clock = clock
        self._books: weakref.WeakSet[StatsBook] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._failed = False
        self._start(None)

    def _start(self, pid: int | None) -> None:
        """Fresh writer state for process ``pid`` (a fork is a new worker, with its own files)."""
        self._pid = pid
        self._made = False
        self._next_state = 0.0
        self._shown: tuple[bool, int] | None = None  # what the state file says
        self._last_stall: Stall | None = None
        self._stalls = 0  # stalls published
        self._stall_lines = 0
        self._profile_second = -1  # the last second whose profile was looked at
        self._profile_upto = -1  # the last second published
        self._profile_ids: dict[Stack, int] = {}
        self._profile_lines = 0

    def add(self, book: StatsBook) -> None:
        """The loops watched for ``book`` are this process's loops."""
        self._books.add(book)

    def path(self, kind: str) -> str:
        ext = "json" if kind == "state" else "jsonl"
        return os.path.join(self.directory, f"{kind}-{self._pid}.{ext}")

    def publish(self) -> None:
        """Bring this process's files up to date (a watchdog thread, a scrape's thread). A
        failure is logged once and survived."""
        try:
            with self._lock:
                self._publish()
        except Exception:
            if not self._failed:
                self._failed = True
                logger.exception("loopwatch: publishing this worker's state to the others failed")

    def _publish(self) -> None:
        pid = os.getpid()
        if pid != self._pid:
            self._start(pid)
        if not self._made:
            os.makedirs(self.directory, exist_ok=True)
            self._made = True
        self._publish_stalls()
        self._publish_profile()
        seen: dict[int, WatchedLoop] = {}
        for book in list(self._books):
            for loop in book.loops():
                seen[id(loop)] = loop
        rows = loop_rows(seen.values())
        if not rows:  # its last loop stopped: it leaves the view
            if self._shown is not None:
                self._shown = None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path("state"))
            return
        held = any(row["blocked"] is not None for row in rows)
        shown = (held, self._stalls)
        now = self._clock()
        if not held and shown == self._shown and now < self._next_state:
            return
        self._shown, self._next_state = shown, now + HEALTHY_EVERY
        last = self._last_stall
        doc = {
            "pid": pid,
            "time": time.time(),
            "loops": rows,
            "stalls": self._stalls,
            "last_stall": last.started_at if last is not None else None,
        }
        _replace(self.path("state"), json.dumps(doc, separators=(",", ":")).encode())

    def _publish_stalls(self) -> None:
        ring = recent_stalls()
        new: list[Stall] = []
        for stall in reversed(ring):
            if stall is self._last_stall:
                break
            new.append(stall)
        if not new:
            return
        new.reverse()
        self._last_stall = ring[-1]
        self._stalls += len(new)
        path = self.path("stalls")
        if self._stall_lines + len(new) > RING_SIZE + RING_SIZE // 2:
            kept = ring[-RING_SIZE:]  # cut back: readers keep the newest RING_SIZE anyway
            _replace(path, self._stall_lines_of(kept))
            self._stall_lines = len(kept)
        else:
            _append(path, self._stall_lines_of(new))
            self._stall_lines += len(new)

    def _stall_lines_of(self, found: list[Stall]) -> bytes:
        return b"".join(
            json.dumps({**s.as_dict(), "pid": self._pid}, separators=(",", ":")).encode() + b"\n"
            for s in found
        )

    def _publish_profile(self) -> None:
        second = int(self._clock())
        if second == self._profile_second:
            return  # at most once a second: only finished seconds are published
        self._profile_second = second
        rotate = self._profile_lines >= 2 * KEEP_SECONDS
        if rotate:  # start the file again from the store's window
            self._profile_ids.clear()
            self._profile_lines = 0
            self._profile_upto = -1
        now, buckets = self.store.completed(self._profile_upto)
        self._profile_upto = now - 1
        if not buckets and not rotate:
            return
        ids = self._profile_ids
        lines: list[str] = []
        for t, counts in buckets:
            pairs = []
            for stack, count in counts.items():
                ident = ids.get(stack)
                if ident is None:
                    ident = ids[stack] = len(ids)
                    lines.append(json.dumps({"s": ident, "k": stack}, separators=(",", ":")))
                pairs.append([ident, count])
            lines.append(json.dumps({"t": t, "c": pairs}, separators=(",", ":")))
        self._profile_lines += len(buckets)
        data = "".join(line + "\n" for line in lines).encode()
        if rotate:
            _replace(self.path("profile"), data)
        else:
            _append(self.path("profile"), data)


_publishers: dict[str, Publisher] = {}
_publishers_lock = threading.Lock()


def publisher_for(directory: str) -> Publisher:
    """The process's one publisher for a multiprocess directory."""
    with _publishers_lock:
        found = _publishers.get(directory)
        if found is None:
            found = _publishers[directory] = Publisher(directory)
        return found


def _replace(path: str, data: bytes) -> None:
    """Write ``path`` atomically: a reader sees the old file or the new one, whole."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _append(path: str, data: bytes) -> None:
    """One write of whole lines (O_APPEND): a reader may see the last one torn, and skips it."""
    with open(path, "ab") as f:
        f.write(data)


# -- reading (the thread serving the page, /stalls, /profile) -------------------------------


@dataclass
class Worker:
    """Another worker's loops, as its state file says."""

    pid: int
    age: float  # seconds since it wrote them
    loops: list[dict[str, Any]]
    stalls: int  # stalls it published so far
    last_stall: float | None  # started_at of its newest one


def workers(directory: str) -> list[Worker]:
    """Every other live worker's loops, by pid (this process's own are read in memory)."""
    base = os.path.join(directory, SUBDIR)
    now = time.time()
    found = []
    own = os.getpid()
    for pid, path in _files(base, "state", ".json"):
        if pid == own:
            continue
        if not alive(pid):
            with contextlib.suppress(OSError):
                os.unlink(path)  # killed: it could not remove it itself
            continue
        doc = _read_json(path)
        if not isinstance(doc, dict):
            continue
        written = _number(doc.get("time"))
        if written is None or now - written > STALE:
            continue
        age = max(0.0, now - written)
        raw = doc.get("loops")
        rows = [_loop_row(r, age) for r in (raw if isinstance(raw, list) else [])[:MAX_LOOPS]]
        stalls_seen = doc.get("stalls")
        found.append(
            Worker(
                pid,
                age,
                [row for row in rows if row is not None],
                stalls_seen if type(stalls_seen) is int and stalls_seen >= 0 else 0,
                _number(doc.get("last_stall")),
            )
        )
    return sorted(found, key=lambda w: w.pid)


def stalls(directory: str, pid: int | None = None) -> list[dict[str, Any]]:
    """Every worker's recent stalls (at most the ring's size each), oldest first, each with
    its ``pid``; with ``pid``, that worker's only."""
    own = os.getpid()
    out: list[dict[str, Any]] = []
    if pid is None or pid == own:
        out += [{**s.as_dict(), "pid": own} for s in recent_stalls()]
    for found, path in _files(os.path.join(directory, SUBDIR), "stalls", ".jsonl"):
        if found == own or (pid is not None and found != pid) or _expired(found, path):
            continue
        out += _parsed(path, functools.partial(_stalls_of, pid=found))
    out.sort(key=lambda s: s["started_at"])
    return out


def profile(
    directory: str, seconds: int, pid: int | None = None, store: ProfileStore = PROFILE
) -> dict[Stack, int]:
    """Every worker's stack counts over the last ``seconds`` (others': their finished
    seconds, published about once a second); with ``pid``, that worker's only."""
    own = os.getpid()
    total = store.counts(seconds) if pid is None or pid == own else {}
    since = int(time.monotonic()) - seconds
    for found, path in _files(os.path.join(directory, SUBDIR), "profile", ".jsonl"):
        if found == own or (pid is not None and found != pid) or _expired(found, path):
            continue
        for t, counts in _parsed(path, _seconds_of):
            if t > since:
                for stack, count in counts:
                    total[stack] = total.get(stack, 0) + count
    return total


def _stalls_of(data: bytes, pid: int) -> list[dict[str, Any]]:
    """A stalls file's newest ``RING_SIZE`` readable records."""
    docs = [_stall_doc(doc, pid) for doc in _lines(data)]
    return [doc for doc in docs if doc is not None][-RING_SIZE:]


def _seconds_of(data: bytes) -> list[tuple[int, list[tuple[Stack, int]]]]:
    """A profile file's seconds: (second, [(stack, ms), ...]), the stacks resolved."""
    named: dict[int, Stack] = {}
    out = []
    for doc in _lines(data):
        if not isinstance(doc, dict):
            continue
        ident, frames = doc.get("s"), doc.get("k")
        if type(ident) is int and isinstance(frames, list) and frames:
            if len(frames) <= MAX_DEPTH + 2 and all(isinstance(f, str) for f in frames):
                named[ident] = tuple(clean(f) for f in frames)
            continue
        t, counts = doc.get("t"), doc.get("c")
        if type(t) is not int or not isinstance(counts, list):
            continue
        second = []
        for pair in counts:
            if isinstance(pair, list) and len(pair) == 2 and type(pair[0]) is int:
                stack, count = named.get(pair[0]), pair[1]
                if stack is not None and type(count) is int and count > 0:
                    second.append((stack, count))
        out.append((t, second))
    return out


# path -> ((mtime_ns, size), parsed): a file is parsed again only once it changed
_cache: dict[str, tuple[tuple[int, int], Any]] = {}


def _parsed(path: str, parse: Callable[[bytes], Any]) -> Any:
    try:
        info = os.stat(path)
    except OSError:
        _cache.pop(path, None)
        return []
    key = (info.st_mtime_ns, info.st_size)
    hit = _cache.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    parsed = parse(_read(path))
    if len(_cache) > 256:  # files of workers long gone
        _cache.clear()
    _cache[path] = (key, parsed)
    return parsed


def _files(base: str, kind: str, ext: str) -> Iterator[tuple[int, str]]:
    """(pid, path) of each ``<kind>-<pid><ext>`` file."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    prefix = kind + "-"
    for name in names:
        if name.startswith(prefix) and name.endswith(ext):
            digits = name[len(prefix) : len(name) - len(ext)]
            if digits.isdigit() and 0 < int(digits) < 1 << 31:
                yield int(digits), os.path.join(base, name)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed and not reaped yet, does not)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: alive
        return True
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[:1] != [b"Z"]
    except OSError:  # no /proc: kill() said it exists
        return True


def _expired(pid: int, path: str) -> bool:
    """A dead worker's file past ``KEEP_DEAD``: removed (True), else kept (False)."""
    if alive(pid):
        return False
    try:
        if time.time() - os.stat(path).st_mtime <= KEEP_DEAD:
            return False
        os.unlink(path)
    except OSError:
        pass
    _cache.pop(path, None)
    return True


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_FILE)
    except OSError:  # removed meanwhile
        return b""


def _read_json(path: str) -> Any:
    try:
        return json.loads(_read(path) or b"null")
    except ValueError:
        return None


def _lines(data: bytes) -> Iterator[Any]:
    for line in data.splitlines():
        try:
            yield json.loads(line)
        except ValueError:  # torn (being appended) or not ours
            continue


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if value == value and abs(value) != float("inf") else None


def _text(value: Any, limit: int = MAX_TEXT) -> str | None:
    if not isinstance(value, str):
        return None
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _loop_row(raw: Any, age: float) -> dict[str, Any] | None:
    """One loop of another worker's state, checked; a stall in progress aged to now."""
    if not isinstance(raw, dict):
        return None
    in_flight = raw.get("in_flight")
    blocked = raw.get("blocked")
    row: dict[str, Any] = {
        "threshold": _number(raw.get("threshold")),
        "in_flight": in_flight if type(in_flight) is int and in_flight >= 0 else 0,
        "blocked": None,
    }
    if isinstance(blocked, dict):
        seconds = _number(blocked.get("seconds"))
        if seconds is not None and seconds >= 0:
            row["blocked"] = {
                "seconds": round(seconds + age, 3),
                "method": _text(blocked.get("method")),
                "route": _text(blocked.get("route")),
                "culprit": _text(blocked.get("culprit")),
            }
    return row


def _stall_doc(raw: Any, pid: int) -> dict[str, Any] | None:
    """One stall of another worker's file, checked, in ``Stall.as_dict``'s shape."""
    if not isinstance(raw, dict):
        return None
    texts = {k: _text(raw.get(k)) for k in ("route", "method", "kind", "culprit")}
    numbers = {k: _number(raw.get(k)) for k in ("duration", "started_at", "cpu_seconds")}
    in_flight = raw.get("requests_in_flight")
    if any(v is None for v in texts.values()) or any(v is None for v in numbers.values()):
        return None
    return {
        **texts,
        **numbers,
        "stack": _text(raw.get("stack"), MAX_STACK) or "",
        "requests_in_flight": in_flight if type(in_flight) is int and in_flight >= 0 else 0,
        "trace_id": _text(raw.get("trace_id"), 64) or "",
        "span_id": _text(raw.get("span_id"), 64) or "",
        "pid": pid,
    }
