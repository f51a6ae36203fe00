"""``names.clip``: a name from the app, escaped and cut to be shown on one line."""

from __future__ import annotations

from loopwatch.names import MAX_NAME, clip


def test_clip_escapes_and_cuts() -> None:
    assert clip("/items/{item_id}") == "/items/{item_id}"
    assert clip("/caf\u00e9/\u65e5\u672c") == "/caf\u00e9/\u65e5\u672c"  # printable: kept
    assert clip("/a\nb\r\t\x00\x7f\u2028") == "/a\\nb\\r\\t\\x00\\x7f\\u2028"
    assert clip("x" * 5000) == "x" * 199 + "\u2026"
    assert clip("/" + "d/" * 200 + "app.py", 20, tail=True) == "\u2026" + "/d" * 6 + "/app.py"
    assert len(clip("\n" * 5000)) == MAX_NAME
    assert len(clip("\n" * 150)) == MAX_NAME  # escaped past the limit: cut too
