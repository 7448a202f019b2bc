"""Parsing and printing sizes and durations for the CLI and the experiment configs."""

from __future__ import annotations

import re

# re.ASCII: \d is [0-9] and \s ASCII blanks (a str pattern's \d also takes other scripts' digits)
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE | re.ASCII)
_DECIMAL = re.compile(r"\s*([0-9]+)\s*", re.ASCII)


def parse_decimal(text: str) -> int:
    """A count as a user types it: ASCII decimal digits (``"5000"``), blanks around them
    allowed. Not what ``int()`` also takes: ``"5_000"``, ``"+5"``, other scripts' digits
    (``"\u0665"``), nor (with base 0) ``"0x10"``, ``"0b11"``, ``"0o7"``.

    Raises:
        ValueError: anything else (the message quotes it).
    """
    m = _DECIMAL.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"{text!r} is not a decimal integer such as 5000 (digits 0-9 only)")
    return int(m.group(1))


_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}


def parse_size(text: str | int) -> int:
    """``"64G"`` -> 68719476736. Binary units (K, M, G, T, P; optional ``iB``/``B``);
    a bare number is bytes.

    Raises:
        ValueError: not a size (the message quotes it).
    """
    if type(text) is int:
        if text < 0:
            raise ValueError(f"size {text} is negative")
        return text
    if not isinstance(text, str):
        raise ValueError(f"size {text!r} is not a string like '64G'")
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not a size like 4K, 2M, 64G or 1T")
    return int(m.group(1)) << _SHIFT[m.group(2).upper()]


def format_size(n: int) -> str:
    """The shortest exact binary-unit spelling: 68719476736 -> ``"64G"``."""
    for unit, shift in (("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n and not n & ((1 << shift) - 1):
            return f"{n >> shift}{unit}"
    return str(n)


def format_ns(ns: int | float) -> str:
    """Modeled time for a human: ``"812 ns"``, ``"3.41 µs"``, ``"12.3 ms"``, ``"4.21 s"``."""
    ns = float(ns)
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if abs(ns) >= scale:
            v = ns / scale
            return f"{v:.3g} {unit}" if v < 100 else f"{v:,.0f} {unit}"
    return f"{ns:.0f} ns"


def time_unit(max_ns: float) -> tuple[str, float]:
    """The unit a plot of times up to ``max_ns`` ns shows them in, and its size in ns:
    ``("s", 1e9)``, ``("ms", 1e6)``, ``("µs", 1e3)`` or ``("ns", 1.0)``."""
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if max_ns >= scale:
            return unit, scale
    return "ns", 1.0
