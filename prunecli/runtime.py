"""Where and how long work runs: devices, torchrun ranks and time limits. The bottom layer beside ``errors``."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import torch
from torch import nn

from prunecli.errors import ArchitectureError, OptionError, PrunecliError


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` picks CUDA when present; an unavailable CUDA device is an error, not a silent CPU run."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise OptionError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PrunecliError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PrunecliError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise OptionError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def channel_block(device: torch.device | str = "cpu", runtime: str = "onnxruntime") -> tuple[int, str]:
    """The channel multiple the deployment runtime's convolution kernels work in, and why.

    onnxruntime's CPU convolutions (MLAS) run in a blocked NCHWc layout whose block is the SIMD width in floats:
    16 with AVX-512F, 8 with AVX2/AVX, 4 with 128-bit SIMD (MLAS ``platform.cpp``, ``NchwcBlockSize``); a conv
    whose channels are not a multiple of the block falls back to a slower path with reorders around it. CUDA's
    tensor cores take fp16 channels in multiples of 8. Measured on an AVX-512 CPU: a torchvision MobileNetV2 pruned
    to half its MACs ran 0.66x as fast as the original under onnxruntime with any channel count, 1.55x with
    multiples of 8 and 1.77x with multiples of 16 (docs/benchmarks.md).
    """
    if torch.device(device).type == "cuda" and runtime == "torch":
        return 8, "CUDA tensor cores take fp16 channels in multiples of 8"
    flags = _cpu_flags()
    if "avx512f" in flags:
        return 16, "onnxruntime's CPU convolutions work in blocks of 16 channels with this CPU's AVX-512"
    if "avx2" in flags or "avx" in flags:
        return 8, "onnxruntime's CPU convolutions work in blocks of 8 channels with this CPU's AVX2"
    return 4, "onnxruntime's CPU convolutions work in blocks of 4 channels with 128-bit SIMD"


def _cpu_flags() -> set[str]:
    """The instruction-set flags of this CPU (Linux's /proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next((set(line.split(":", 1)[1].split()) for line in handle if line.startswith("flags")), set())
    except OSError:
        return set()


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
