"""How options read in ``--help`` and in usage lines: a flag shows no value, a value shows a word in capitals (``N``,
``X``, ``GLOB``, ``DIR``, ``MODEL``), a number's range is written with that word (``N>=1``) and a choice lists its
values (``<l1|l2|...>``).

Typer 0.29 shows every parameter by its Python type (``--version <bool>``, ``--ignore <list[str]>``,
``--calib-images <int range> [x>=1]``, ``prune [OPTIONS] {model}``), which makes flags look as if they took a
value. Its one hook is a parameter's ``metavar``; :func:`name_values` sets it on every parameter of a command
(the ``--help`` option included) that does not declare its own, and :class:`Command` puts arguments in the usage
line as click does (``MODEL``, an optional one ``[MODEL]``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from typer import _click
from typer._display import describe_number_range
from typer.core import TyperCommand

# The word of an option whose value is more than its type says; any other value is named by its type (TYPE_WORDS).
WORDS = {
    "--ignore": "GLOB", "--import-path": "DIR", "--data-root": "DIR",
    "--data": "DATA", "--val-data": "DATA", "--eval-data": "DATA",
    "--arch": "ARCH", "--compare-arch": "ARCH", "--teacher-arch": "ARCH", "--arch-kwargs": "JSON",
    "--input-shape": "CxHxW", "--device": "DEVICE", "--mean": "M,M,M", "--std": "S,S,S",
    "--flops-target": "BUDGET", "--params-target": "BUDGET", "--preview-flops-target": "BUDGET",
    "--ratio": "RATIO", "--latency-target": "LATENCY",
    "--timeout": "SECONDS", "--score-timeout": "SECONDS",
    "-o": "FILE", "--output": "FILE", "--report": "FILE", "--scores": "FILE", "--checkpoint": "FILE",
    "--compare": "MODEL", "--teacher": "MODEL",
}
TYPE_WORDS = {int: "N", float: "X", str: "TEXT", Path: "PATH"}


def word(param: _click.Parameter) -> str | None:
    """What ``param`` shows for its value: nothing for a flag, its word, an argument's name in capitals, or None
    for a choice (Typer's ``<a|b|c>`` says it best)."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return ""
    if param.param_type_name == "argument":
        return (param.name or "").upper()
    named = next((WORDS[opt] for opt in param.opts if opt in WORDS), None)
    if named is not None:
        return named
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None or descriptor.is_choice:
        return None
    annotation = descriptor.annotation
    element = annotation.__args__[0] if descriptor.is_list and getattr(annotation, "__args__", None) else annotation
    return TYPE_WORDS.get(element, "VALUE")


def name_values(params: Iterable[_click.Parameter]) -> None:
    """Give every parameter that declares no ``metavar`` its :func:`word`; a number's range moves into the word
    (``N>=1`` instead of ``<int range> [x>=1]``). Typer validates ranges by the option's declaration, not by these
    attributes, which only its help reads."""
    for param in params:
        if param.metavar is not None:
            continue
        text = word(param)
        if text is None:
            continue
        low, high = getattr(param, "min", None), getattr(param, "max", None)
        if text and (low is not None or high is not None) and param.param_type_name == "option":
            text = describe_number_range(low, high).replace("x", text)
            param.min = param.max = None
        param.metavar = text


class NamedValues:
    """Mixed into a Typer command or group: its parameters and its ``--help`` option get :func:`name_values`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        name_values(self.params)

    def get_help_option(self, ctx: _click.Context):
        option = super().get_help_option(ctx)
        if option is not None:
            name_values([option])
        return option


class Command(NamedValues, TyperCommand):
    """A Typer command whose help names values as :func:`name_values` does and whose usage line shows
    ``MODEL`` (click's form) rather than ``{model}``."""

    def collect_usage_pieces(self, ctx: _click.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                shown = param.metavar or (param.name or "").upper()
                shown = shown if param.required else f"[{shown}]"
                pieces.append(shown + ("..." if param.nargs != 1 else ""))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces
