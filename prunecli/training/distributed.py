"""The run's hardware plumbing: the process group under ``torchrun`` (start, all-reduce, averaged buffers,
stop), mixed precision's dtype and gradient scaler, and a random state the run cannot leak to its caller.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is started (gloo on CPU, nccl on CUDA) unless the
caller started one already; only a group started here is destroyed at the end.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prunecli.errors import PrunecliError, first_line
from prunecli.runtime import resolve_device, world_size


@dataclass
class Distributed:
    """This process's place in the run: its rank among ``world`` processes and its device."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool = False

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the ranks, in place (nothing to do for one process)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    @torch.no_grad()
    def broadcast(self, model: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank, as DistributedDataParallel copies them when it wraps
        the model (nothing to do for one process)."""
        if self.world < 2:
            return
        import torch.distributed as dist

        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.detach(), 0)

    @torch.no_grad()
    def average_buffers(self, model: nn.Module) -> None:
        """Average the BatchNorm running statistics over the ranks (each rank saw its own shard), so every rank
        validates, keeps and saves the same model (timm's ``distribute_bn`` with reduce)."""
        if self.world < 2:
            return
        for buffer in model.buffers():
            if buffer.is_floating_point():
                self.all_reduce(buffer)
                buffer.div_(self.world)

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` as the steps run it: in DistributedDataParallel (which broadcasts rank 0's weights) when
        there are several processes."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    @contextlib.contextmanager
    def isolated_rng(self) -> Iterator[None]:
        """The global random state (CPU and this process's GPU) as it was, once the block ends."""
        devices = []
        if self.device.type == "cuda":
            devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=devices):
            yield

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def setup_distributed(device_name: str) -> Distributed:
    """One process on ``device_name``, or this rank of a ``torchrun`` launch (on GPU ``LOCAL_RANK``)."""
    device = resolve_device(device_name)
    world = world_size()
    if world <= 1 or not torch.distributed.is_available():
        return Distributed(0, 1, device)
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        except Exception as exc:
            first = first_line(exc, 150)
            raise PrunecliError(
                f"cannot start distributed training ({type(exc).__name__}: {first}); launch with torchrun"
            ) from exc
        owns = True
    return Distributed(dist.get_rank(), dist.get_world_size(), device, owns)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """``--amp``'s dtype on ``device``: None (full precision), bfloat16 where the GPU has it, else float16."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise PrunecliError(f"--amp on needs a CUDA device, but the run is on {device}; use --amp auto or off")
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def grad_scaler(dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """float16 needs its loss scaled against underflow; bfloat16 and full precision do not."""
    return torch.amp.GradScaler("cuda") if dtype == torch.float16 else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The forward pass's mixed precision context (none without a dtype)."""
    return torch.autocast(device.type, dtype) if dtype is not None else contextlib.nullcontext()
