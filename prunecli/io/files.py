"""Atomic output files: an artifact is either fully written or not there at all."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from prunecli.errors import ExportError, OptionError


def check_output_path(path: Path, *, force: bool, inputs: tuple[Path, ...] = (), option: str = "-o",
                      folder_made_by: Callable[[Path], bool] | None = None) -> None:
    """Refuse outputs that would clobber a file or land in a directory that is not there.

    Args:
        option: the option that names ``path``, for the messages (``-o`` is called "output").
        folder_made_by: the output is a folder (:func:`atomic_folder`); one already there is replaced, with
            ``force``, only when this says the writer made it (never a folder of the user's).
    """
    name = "output" if option == "-o" else option
    folder = folder_made_by is not None
    if path.exists() and path.is_dir() and not folder:
        raise ExportError(f"{name} {path} is a directory; give a file name such as {path / 'model.safetensors'}")
    if path.exists() and folder and not path.is_dir():
        raise ExportError(f"{name} {path} is a file; give a folder name (or remove the file)")
    for source in inputs:
        if source.exists() and path.exists() and path.resolve() == source.resolve():
            raise ExportError(f"{name} {path} is the input {'folder' if folder else 'file'}; choose another {option} path")
    if path.exists() and not force:
        raise ExportError(f"{name} {path} already exists; pass --force to overwrite it")
    if path.exists() and folder and not folder_made_by(path):
        raise ExportError(f"{name} {path} is a folder prunecli did not write; --force replaces only those, choose "
                          f"another {option} path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"{name} directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"{name} directory {parent} is not writable; choose another {option} path")


@contextlib.contextmanager
def atomic_folder(path: Path, *, force: bool, made_by: Callable[[Path], bool],
                  inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """:func:`atomic_output` for a folder: yield a temporary folder beside ``path``; on success fsync its files and
    rename it to ``path`` (a folder already there, which ``made_by`` says this writer made, is moved aside first and
    removed after; see :func:`check_output_path`). Any exception removes the temporary folder."""
    import shutil

    path = Path(path)
    check_output_path(path, force=force, inputs=inputs, folder_made_by=made_by)
    tmp = old = None
    try:
        with _signals_held():
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        yield tmp
        for file in sorted(tmp.iterdir()):
            os.chmod(file, 0o666 & ~_umask())
            with open(file, "rb+") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o777 & ~_umask())
        with _signals_held():
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
                os.replace(path, old / path.name)
            os.replace(tmp, path)
            tmp = None
            for placed in _recorders:
                placed.append(path)
    except OSError as exc:
        raise ExportError(f"could not write {path}: {exc.strerror or exc}; check free space and permissions") from exc
    finally:
        for leftover in (tmp, old):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)


def check_suffix(path: Path, suffixes: Sequence[str], needs: str, alternative: str = "") -> None:
    """Refuse an output name whose extension promises another format than the one written, before any work.

    Args:
        needs: what dictates the format, e.g. "--format onnx" or "a slim model".
        alternative: another way out, appended to the advice to rename.
    """
    if path.suffix.lower() not in suffixes:
        raise OptionError(
            f"output {path} does not end in {' or '.join(suffixes)} as {needs} needs; "
            f"rename it (e.g. {path.with_suffix(suffixes[0]).name}){alternative}"
        )


_recorders: list[list[Path]] = []  # the lists of open recording_outputs() blocks


@contextlib.contextmanager
def recording_outputs() -> Iterator[list[Path]]:
    """Collect the outputs :func:`atomic_output` puts in place inside the block, so that a command stopped by a
    signal can say truthfully whether it wrote anything."""
    placed: list[Path] = []
    _recorders.append(placed)
    try:
        yield placed
    finally:
        _recorders.remove(placed)


@contextlib.contextmanager
def atomic_output(path: Path, *, force: bool, inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    Any exception (KeyboardInterrupt included) removes the temporary file, so readers never see a
    half-written artifact and an existing file is replaced only by a complete one.
    """
    path = Path(path)
    check_output_path(path, force=force, inputs=inputs)
    mode = 0o666 & ~_umask()
    tmp = written = None
    try:
        with _signals_held():  # no interrupt between creating the file and knowing its name
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            tmp = Path(tmp_name)
        os.close(fd)
        yield tmp
        os.chmod(tmp, mode)  # after writing: mkstemp (and writers that rename their own temp) make it private
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
            written = os.fstat(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise ExportError(f"could not write {path}: {exc.strerror or exc}; check free space and permissions") from exc
    finally:
        if written is not None and _is_file(path, written):  # in place, even if an interrupt came right after
            for placed in _recorders:
                placed.append(path)
        if tmp is not None:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block ends (where the platform can)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _is_file(path: Path, status: os.stat_result) -> bool:
    try:
        return os.path.samestat(os.stat(path), status)
    except OSError:
        return False


def write_through_memory(path: Path, serialise: Callable[[BinaryIO], object]) -> None:
    """Serialise into memory, then write the bytes to ``path`` with plain file I/O.

    torch.save and torch.jit.save name the folder inside their zip after the file they write (the random temp
    name), but ``archive/`` for a buffer, so the bytes depend on the content only; and a full disk becomes an
    ``OSError`` that :func:`atomic_output` reports, not a writer's RuntimeError or a C++ abort.
    """
    buffer = io.BytesIO()
    serialise(buffer)
    path.write_bytes(buffer.getbuffer())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: Path, *more: Path) -> str:
    """The SHA-256 of a file's bytes; with ``more``, of the files' bytes one after another (a model in shards)."""
    digest = hashlib.sha256()
    for part in (path, *more):
        with open(part, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
