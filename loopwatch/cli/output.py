"""Output: rich when installed (colour on a terminal, plain text otherwise), else plain text."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from loopwatch.names import clip

__all__ = ["MAX_CELL", "Output", "render_plain_table"]

MAX_CELL = 100  # characters in a table cell: longer names are cut with "…"


class Output:
    """Tables, lines and a progress display, through rich if it is installed."""

    def __init__(self, stream: IO[str] | None = None, plain: bool = False) -> None:
        self.stream = sys.stdout if stream is None else stream
        self._console: Any = None
        if not plain and importlib.util.find_spec("rich") is not None:
            from rich.console import Console

            is_tty = self.stream.isatty()
            # In a log nothing wraps: a table row stays one line, whatever COLUMNS says.
            width = None if is_tty else 500
            self._console = Console(file=self.stream, highlight=False, width=width)

    @property
    def is_terminal(self) -> bool:
        return bool(self._console.is_terminal) if self._console is not None else False

    def line(self, text: str = "", style: str | None = None) -> None:
        if self._console is not None:
            self._console.print(text, style=style, markup=False, soft_wrap=not self.is_terminal)
        else:
            print(text, file=self.stream, flush=True)

    def clear(self) -> None:
        if self._console is not None and self.is_terminal:
            self._console.clear()

    def table(
        self,
        title: str,
        headers: Sequence[str],
        rows: Sequence[Sequence[str]],
        right: Sequence[int] = (),
        row_styles: Sequence[str | None] = (),
        widths: Sequence[int] = (),
    ) -> None:
        """``widths``: the most characters a cell of each column shows (else ``MAX_CELL``);
        every cell is escaped and cut to it, so a row stays one line of bounded length."""
        rows = [
            [clip(cell, widths[i] if i < len(widths) else MAX_CELL) for i, cell in enumerate(row)]
            for row in rows
        ]
        self.line(title, style="bold")
        if self._console is None:
            print(render_plain_table(headers, rows, right), file=self.stream, flush=True)
            return
        from rich import box
        from rich.table import Table
        from rich.text import Text

        table = Table(box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)
        for i, header in enumerate(headers):
            table.add_column(
                header,
                justify="right" if i in right else "left",
                overflow="fold",
                no_wrap=i == 0 or i in right,  # on a narrow terminal, text columns wrap
            )
        for i, row in enumerate(rows):
            style = row_styles[i] if i < len(row_styles) else None
            table.add_row(*(Text(cell) for cell in row), style=style)
        if self.is_terminal:
            self._console.print(table)
            return
        # no padding to the console's width: trailing spaces only get in the way
        with self._console.capture() as capture:
            self._console.print(table)
        lines = [line.rstrip() for line in capture.get().splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        while lines and not lines[0]:
            lines.pop(0)
        print("\n".join(lines), file=self.stream, flush=True)

    @contextlib.contextmanager
    def progress(self, label: str, total: int) -> Iterator[Callable[[], None]]:
        """Yields a function to call once per finished request."""
        if self.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            columns = (
                TextColumn("{task.description:<22}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            with Progress(*columns, console=self._console) as bar:
                task = bar.add_task(label, total=total)
                yield lambda: bar.advance(task)
            return
        start = time.perf_counter()
        done = 0

        def advance() -> None:
            nonlocal done
            done += 1

        yield advance
        self.line(f"  {label:<22} {done}/{total} requests in {time.perf_counter() - start:.1f}s")


def render_plain_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()
) -> str:
    """A table as plain text, for a terminal without rich."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=False)]

    def fmt(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    lines = [fmt(headers), fmt(["-" * w for w in widths])]
    lines += [fmt(row) for row in rows]
    return "\n".join(lines)
