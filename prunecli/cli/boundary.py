"""The boundary between the library and the shell: domain errors become one line and an exit code, signals stop a
command cleanly, progress goes to stderr. Commands run their work through :func:`run`."""

from __future__ import annotations

import contextlib
import difflib
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import typer
from rich.console import Console
from typer.core import TyperGroup

from prunecli.cli.help import NamedValues
from prunecli.errors import OptionError, PrunecliError, first_line
from prunecli.io.files import recording_outputs

T = TypeVar("T")

err = Console(stderr=True)
state = {"debug": False}  # --debug, set by the app callback


class OneLineUsageErrors(NamedValues, TyperGroup):
    """Usage errors (exit 2) as one line ``error: ...``, like every other error, instead of Typer's boxed panel;
    its flags named in ``--help`` as every command's are (:mod:`prunecli.cli.help`)."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as exc:  # click's UsageError and its kin, re-raised outside standalone mode
            if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
                say_error(usage_message(exc.format_message(), getattr(exc, "ctx", None)))
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


def usage_message(message: str, context) -> str:
    """Click's usage error and where to read more: ``...; see 'prunecli prune --help'``, or after a question
    (``Did you mean 'prune'?``) a sentence of its own. A bad choice loses the validator's "Value error," and gains
    the nearest choice where the value misspells one: "'fgpm' is not one of 'l1', 'fpgm', ...; did you mean
    'fpgm'?"."""
    message = message.strip().replace("Value error, ", "").rstrip(".")
    misspelt = re.search(r"'([^']*)' is not one of (.*)$", message)
    if misspelt:
        close = difflib.get_close_matches(misspelt.group(1), re.findall(r"'([^']*)'", misspelt.group(2)), n=1)
        if close:
            message += f"; did you mean '{close[0]}'?"
    if context is None:
        return message
    if message.endswith("?"):
        return f"{message} See '{context.command_path} --help'."
    return f"{message}; see '{context.command_path} --help'"


def say_error(message: str) -> None:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> None:
    """Print ``error: message`` on stderr and exit with ``code`` (2: a usage error)."""
    say_error(message)
    raise typer.Exit(code)


class _Terminated(BaseException):
    """SIGTERM as an exception, so that cleanups (atomic_output's temp file) run as they do for Ctrl-C."""


def _raise_terminated(signum, frame):
    raise _Terminated


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _stopped(how: str, written: list[Path]) -> str:
    """What a signal left: nothing, or complete outputs (one may land between the rename and the return)."""
    if not written:
        return f"{how}; no output was written"
    return f"{how} after writing {' and '.join(map(str, written))} completely"


def run(call: Callable[[], T]) -> T | None:
    """Domain errors become one line and exit 1 (an option value out of range or malformed: 2); Ctrl-C exits 130
    and SIGTERM 143; anything else is an internal error."""
    with _sigterm_raises(), recording_outputs() as written:
        if state["debug"]:
            return call()
        try:
            return call()
        except OptionError as exc:
            fail(str(exc), 2)
        except PrunecliError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail(_stopped("interrupted", written), 130)
        except _Terminated:
            fail(_stopped("terminated", written), 143)
        except MemoryError:
            fail("out of memory; try a smaller --input-shape or batch size")
        except Exception as exc:
            fail(f"internal error ({type(exc).__name__}: {first_line(exc, 200)}); rerun with --debug and report it")
    return None


class Progress:
    """Stage messages on stderr; silent with -q or --json. On a terminal, one live line with a bar over the
    calibration images; elsewhere (a pipe, ``2>log``, CI) each stage message as one plain line, no bar and no
    ANSI, so a log shows what a long run is doing while it does it."""

    def __init__(self, enabled: bool, images: int | None = None):
        from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        self.enabled = enabled
        self.live = enabled and err.is_terminal
        self._said: str | None = None
        self._bar = Bar(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), console=err, transient=True, disable=not self.live)
        self._stage = self._bar.add_task("starting", total=images)

    def __enter__(self):
        self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self._bar.__exit__(*exc)

    def stage(self, message: str) -> None:
        if self.live:
            self._bar.update(self._stage, description=message)
        elif self.enabled and message != self._said:  # a repeated message says nothing new
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
        self._said = message

    def images(self, count: int) -> None:
        self._bar.advance(self._stage, count)

    def steps(self, done: int, total: int) -> None:
        self._bar.update(self._stage, completed=done, total=total)
