"""Budgets: what a pruned model keeps ("0.5", "50%", "2.1G" of its MACs, "12ms" of latency), parsed and resolved.

The budget option the papers name ``--flops-target`` counts multiply-accumulates (MACs, the thop convention);
in code the kind is "macs". Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prunecli.errors import BudgetError, OptionError
from prunecli.humanize import human

KINDS = ("macs", "params", "latency", "ratio")
OPTIONS = {"macs": "--flops-target", "params": "--params-target", "latency": "--latency-target", "ratio": "--ratio"}
_LEGACY_KINDS = {"flops": "macs"}  # what slim files written by prunecli 0.1 call the MACs budget
_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([%KMGT]?)\s*$", re.IGNORECASE)
_MILLISECONDS = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|%)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """What to keep: ``kind`` is "macs", "params", "latency" or "ratio" (share of each layer's channels removed).

    For macs/params/latency, ``value`` is a fraction of the original to keep when ``absolute`` is false, else
    a count (MACs or parameters) or milliseconds (the measured latency). For ratio it is the fraction removed.
    """

    kind: str
    value: float
    absolute: bool = False
    text: str = ""

    @property
    def option(self) -> str:
        return OPTIONS[self.kind]

    def target(self, original: float) -> float:
        """The cost to reach, given the original model's cost."""
        if self.absolute:
            if self.value >= original:
                own = f"{original:.3g} ms" if self.kind == "latency" else human(original)
                raise BudgetError(f"{self.option} {self.text} is not below the model's own {own}; ask for less")
            return self.value
        return self.value * original if self.kind != "ratio" else (1 - self.value) * original

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Budget:
        kind = str(data["kind"])
        return cls(_LEGACY_KINDS.get(kind, kind), float(data["value"]), bool(data.get("absolute", False)),
                   str(data.get("text", "")))


def parse_budget(kind: str, text: str) -> Budget:
    """Parse a budget option. Fractions must lie strictly between 0 and 1; a malformed value is an OptionError."""
    if kind not in KINDS:
        raise ValueError(f"unknown budget kind {kind!r}; one of {', '.join(KINDS)}")
    option = OPTIONS[kind]
    if kind == "latency":
        return _parse_latency(option, str(text))
    match = _NUMBER.match(str(text))
    if not match:
        raise OptionError(f"{option} {text!r} is not a number; use a fraction (0.5), a percentage (50%) or a count (2.1G)")
    number, suffix = float(match.group(1)), match.group(2).upper()
    if suffix == "%":
        number, suffix = number / 100, ""
    absolute = suffix != "" or number > 1
    if kind == "ratio" and absolute:
        raise OptionError(f"{option} {text!r} must be a fraction of channels to remove, between 0 and 1 (e.g. 0.3)")
    if absolute and suffix == "" and number < 1000:
        raise OptionError(
            f"{option} {text!r} is neither a fraction nor a plausible count; use 0.5, 50% or a count such as 2.1G"
        )
    if absolute:
        return Budget(kind, number * _SUFFIX[suffix], True, str(text))
    if not 0 < number < 1:
        raise OptionError(f"{option} {text!r} must lie strictly between 0 and 1 (or be a count such as 2.1G)")
    return Budget(kind, number, False, str(text))


def _parse_latency(option: str, text: str) -> Budget:
    """A fraction of the original's measured latency (0.5, 50%) or milliseconds (12ms)."""
    match = _MILLISECONDS.match(text)
    usage = "use a fraction of the original's measured latency (0.5), a percentage (50%) or milliseconds (12ms)"
    if not match:
        raise OptionError(f"{option} {text!r} is not a latency; {usage}")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    if unit == "ms":
        if not number > 0:
            raise OptionError(f"{option} {text!r} must be a positive number of milliseconds")
        return Budget("latency", number, True, text)
    fraction = number / 100 if unit == "%" else number
    if not 0 < fraction < 1:
        raise OptionError(f"{option} {text!r} must lie strictly between 0 and 1 of the original; {usage}")
    return Budget("latency", fraction, False, text)
