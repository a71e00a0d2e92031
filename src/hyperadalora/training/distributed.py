"""Devices and processes: the device check, the process group of a multi-process run (torchrun / accelerate launch),
DistributedDataParallel, and each process's slice of a global batch.

The loop shards each global batch itself (`shard_batch`) rather than through accelerate's data loader, so that
every world size sees the batches of a single process with ``world * batch_size`` examples (the same losses).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def check_device(device: Optional[str]) -> None:
    """A clear error for a device this machine does not have (before the model loads)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device={device!r} is not a device name: use cpu, cuda or cuda:N (or leave it unset: "
                         f"cuda when available, else cpu).") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}, but CUDA is not available here (torch {torch.__version__}, "
                             f"{'no GPU found' if torch.version.cuda else 'a CPU-only build'}): use --device cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}, but there are {torch.cuda.device_count()} CUDA device(s).")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"device={device!r}: use cpu, cuda or cuda:N.")


@dataclass
class Distributed:
    """This process's place in a multi-process run (torchrun / accelerate launch set RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT); ``world == 1`` for a plain single-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False   # this run initialised the process group (and destroys it at the end)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process (a no-op in a single-process run)."""
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this run created it."""
        if self.owns_group:
            dist.destroy_process_group()


def setup_distributed(device_arg: Optional[str]) -> tuple[Distributed, torch.device]:
    """(Distributed, device). Under torchrun / accelerate launch (WORLD_SIZE > 1) joins the process group:
    nccl on CUDA (one GPU per process, cuda:LOCAL_RANK), gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_arg is None and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        device_arg = "cpu"  # accelerate launch --cpu
    use_cuda = device_arg != "cpu" and (torch.cuda.is_available() if device_arg is None
                                        else str(device_arg).startswith("cuda"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return Distributed(), torch.device(device_arg or ("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, owns), device


def wrap_ddp(model, device):
    """DistributedDataParallel around ``model``: parameters and buffers (the recurrent state) are copied from
    process 0 once; after that the buffers are not synchronised before each forward, since the state is
    computed identically on every process from identical parameters (no copy of it per step)."""
    device_ids = [device.index] if device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:  # torch >= 2.13
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
    for buffer in model.buffers():  # older torch: broadcast_buffers=False also skips the copy at start
        dist.broadcast(buffer.data, src=0)
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def shard_batch(batch: dict, dist_info: Distributed) -> dict:
    """This process's contiguous slice of a global batch (``world * batch_size`` examples): process k of a
    2-process run with batch B sees the examples k*B .. (k+1)*B-1 of a 1-process run's batch of 2B."""
    if dist_info.world == 1:
        return batch
    return {k: torch.tensor_split(v, dist_info.world)[dist_info.rank] for k, v in batch.items()}


def all_mean(values: list, dist_info: Distributed, device) -> list:
    """The mean over processes of a few floats (one all_reduce)."""
    if dist_info.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist_info.world).tolist()
