"""Where and how long work runs: devices, torchrun ranks and time limits. The bottom layer beside ``errors``."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import torch
from torch import nn

from prunecli.errors import ArchitectureError, PrunecliError


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` picks CUDA when present; an unavailable CUDA device is an error, not a silent CPU run."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise PrunecliError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PrunecliError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PrunecliError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise PrunecliError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); CPU for a model that holds neither."""
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def rank() -> int:
    """This process's torchrun rank (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    """The number of torchrun processes (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def main_process() -> bool:
    """True unless this is a torchrun worker of rank > 0: only the main process writes files."""
    return rank() == 0


def cpu_count() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextlib.contextmanager
def time_limit(
    seconds: float | None, stage: str, hint: str = "raise --timeout or --ignore the slow part"
) -> Iterator[None]:
    """Raise ArchitectureError naming ``stage`` and ``hint`` if the block runs longer than ``seconds`` (main thread,
    POSIX only).

    The alarm raises inside whatever code runs when it fires. Library code that catches ``Exception`` there (or a
    ``__del__`` or callback that Python reports and drops) would swallow that raise, so the expiry is also kept
    as a flag: when the block ends, normally or with another error, after the deadline passed, the time-limit
    error is raised all the same."""
    usable = seconds and hasattr(signal, "SIGALRM")
    expired = False

    def error() -> ArchitectureError:
        return ArchitectureError(f"{stage} took longer than {seconds:g} s; {hint}")

    def handler(signum, frame):
        nonlocal expired
        expired = True  # set before raising: a swallowed raise still counts
        raise error()

    if usable:
        try:
            previous = signal.signal(signal.SIGALRM, handler)
        except ValueError:  # not in the main thread
            usable = False
    if not usable:
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except Exception as exc:
        if expired and not (isinstance(exc, ArchitectureError) and str(exc) == str(error())):
            raise error() from exc  # the library turned the alarm into another error
        raise
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous)
    if expired:
        raise error()
