"""The original and the pruned network run side by side over the calibration images, stopping together at every
layer to refit.

One forward pass suffices because every calibration batch runs in a thread of its own through each network, paused at
every refit layer: once all batches have reached layer L (only one thread computes at a time), L is solved on the
statistics of all of them and the threads run on to the next layer. The memory this takes is what one forward keeps
alive for one batch, times the number of batches, for both networks.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from prunecli.errors import ArchitectureError


class _Abort(BaseException):
    """Unwinds a paused forward pass that is no longer wanted (not an Exception: user code must not catch it)."""


_ACTIVE = threading.local()


class _PausedForward:
    """One forward pass of ``model`` on ``x`` in a thread of its own, stopping at the first call of every watched
    layer; :meth:`advance` runs it to its next stop and returns ``(layer, tensor)``, or None once it has finished."""

    def __init__(self, model: nn.Module, x: Tensor):
        self._model, self._x = model, x
        self._go, self._arrived = threading.Semaphore(0), threading.Semaphore(0)
        self._stop: tuple[str, Tensor] | None = None
        self._error: BaseException | None = None
        self._abort = False
        self._seen: set[str] = set()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._started = False

    def _main(self) -> None:
        _ACTIVE.forward = self
        self._go.acquire()
        try:
            if not self._abort:
                with torch.no_grad():
                    self._model(self._x)
        except _Abort:
            pass
        except BaseException as exc:  # handed to the coordinating thread
            self._error = exc
        self._stop = None
        self._arrived.release()

    def pause(self, layer: str, tensor: Tensor) -> None:
        """Called by a hook inside the pass: hand ``tensor`` over and wait to be resumed."""
        if layer in self._seen:
            return  # a layer called twice in one forward is fit on its first call
        self._seen.add(layer)
        self._stop = (layer, tensor)
        self._arrived.release()
        self._go.acquire()
        if self._abort:
            raise _Abort

    def advance(self) -> tuple[str, Tensor] | None:
        if not self._started:
            self._started = True
            self._thread.start()
        self._go.release()
        self._arrived.acquire()
        if self._error is not None:
            raise self._error
        return self._stop

    def close(self) -> None:
        if self._started and self._thread.is_alive():
            self._abort = True
            self._go.release()
            self._thread.join()


def _watch(model: nn.Module, layers: Sequence[str], where: str) -> list[Any]:
    """Hooks that pause the calling thread's forward pass at ``layers`` (their input or their output)."""

    def stop(layer: str, tensor: Tensor) -> None:
        forward = getattr(_ACTIVE, "forward", None)
        if forward is not None:
            forward.pause(layer, tensor)

    handles = []
    for layer in layers:
        module = model.get_submodule(layer)
        if where == "input":
            handles.append(module.register_forward_pre_hook(lambda mod, args, layer=layer: stop(layer, args[0])))
        else:
            handles.append(module.register_forward_hook(lambda mod, args, out, layer=layer: stop(layer, out)))
    return handles


class Lockstep:
    """The original and the pruned network run side by side over every batch, stopping at each watched layer.

    Iterating yields ``(layer, pairs)`` in forward order, ``pairs`` being each batch's (pruned input, original output)
    of that layer; a change made to the pruned layer before the next step is what the batches then run through.
    """

    def __init__(self, original: nn.Module, pruned: nn.Module, batches: Sequence[Tensor], layers: Sequence[str]):
        self._handles = _watch(original, layers, "output") + _watch(pruned, layers, "input")
        self._passes = [(_PausedForward(original, x), _PausedForward(pruned, x)) for x in batches]

    def __iter__(self):
        while True:
            stops = [(reference.advance(), slim.advance()) for reference, slim in self._passes]
            names = {stop[0] if stop else None for pair in stops for stop in pair}  # None: the pass has finished
            if len(names) != 1:
                raise ArchitectureError(
                    "the original and the pruned model ran their layers in different orders "
                    f"({sorted(names, key=str)[:3]}); reconstruction needs a forward that does not depend on the data"
                )
            (layer,) = names
            if layer is None:
                return
            yield layer, [(b[1], a[1]) for a, b in stops]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        for pair in self._passes:
            for forward in pair:
                forward.close()
