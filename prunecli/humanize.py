"""Numbers and words in messages: counts in the 2.1G/310.2K style the budget options accept, and plurals.

One formatter for every count a person reads (the report's tables, error messages, progress), so a number an
error quotes can be pasted back into ``--flops-target`` or ``--params-target`` as it is written.
"""

from __future__ import annotations

_UNITS = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3))  # the suffixes config.parse_budget reads back


def human(number: float, digits: int = 2) -> str:
    """A count with a K/M/G/T suffix and ``digits`` decimals: 1234567 -> '1.23M', 310200 -> '310.20K'.

    Below a thousand: the integer as it is (``7``), other numbers with ``digits`` decimals (``0.50``).
    """
    for unit, scale in _UNITS:
        if abs(number) >= scale:
            return f"{number / scale:.{digits}f}{unit}"
    return f"{number:.0f}" if float(number).is_integer() else f"{number:.{digits}f}"


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``1 thread``, ``2 threads``; ``many`` for a plural that is not ``noun + "s"`` (``1 slim model``)."""
    return f"{count} {noun if count == 1 else (many or noun + 's')}"
