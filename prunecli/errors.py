"""Domain errors. The CLI turns each into one line on stderr and exit code 1, an :class:`OptionError` exit 2."""


class PrunecliError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class OptionError(PrunecliError):
    """An option value is malformed or out of range, or options that exclude each other were given: a usage error."""


class CheckpointError(PrunecliError):
    """A model file cannot be read, is unsafe to read, or does not match its architecture."""


class ArchitectureError(PrunecliError):
    """An architecture spec cannot be resolved or the model cannot be traced for pruning."""


class BudgetError(PrunecliError):
    """A budget cannot be reached on this model."""

    def __init__(self, message: str, least: float | None = None):
        super().__init__(message)
        self.least = least  # the lowest cost pruning can reach, where that is why the budget failed


class SpeedupError(PrunecliError):
    """``--check-speedup``: the slim model is not faster than the original where it runs."""


class DataError(PrunecliError):
    """Calibration or training data is missing, unreadable or of the wrong shape."""


class ExportError(PrunecliError):
    """An artifact cannot be written or verified."""


def first_line(text: object, limit: int | None = None) -> str:
    """The first line of ``str(text)`` (an exception's message, a warning), cut at ``limit`` characters; ``""``
    for an empty message."""
    lines = str(text).splitlines()
    return lines[0][:limit] if lines else ""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``TypeName: first line of the message`` (cut at ``limit`` characters), for an error inside a message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    text = text[:limit] + ("..." if len(text) > limit else "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
