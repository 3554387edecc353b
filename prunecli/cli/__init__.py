"""The command line: ``commands`` (the Typer app: options -> config -> one api call -> report), ``options`` (the one
vocabulary of options, their help panels and the hidden old spellings) and ``boundary`` (errors, signals and
progress between the library and the shell)."""

from prunecli.cli.commands import app, main

__all__ = ["app", "main"]
