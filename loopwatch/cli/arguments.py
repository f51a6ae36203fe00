"""Parsers for option values shared by the commands: errors name the value and what was
expected, and argparse adds the option's name."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["port_number", "positive_int", "seconds"]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a whole number >= 1")
    return value


def seconds(minimum: float, strict: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            expected = f"a number of seconds {'>' if strict else '>='} {minimum:g}"
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {expected}")
        return value

    return parse


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected a port from 1 to 65535 (0: pick a free one)"
        )
    return value
