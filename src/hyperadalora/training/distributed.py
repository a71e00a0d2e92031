"""Devices and processes: the device check, the process group of a multi-process run (torchrun / accelerate launch),
DistributedDataParallel, and each process's slice of a global batch.

The loop shards each global batch itself (`shard_batch`) rather than through accelerate's data loader, so that
every world size sees the batches of a single process with ``world * batch_size`` examples (the same losses).
"""

from __future__ import annotations

import contextlib
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


# ---------------------------------------------------------------------------------------------- FSDP (FSDP2)
def fsdp_from_env() -> bool:
    """Whether ``accelerate launch`` was given an FSDP config (it sets ACCELERATE_USE_FSDP=true)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")


def transformer_blocks(model: torch.nn.Module, names: Optional[list] = None) -> list:
    """The modules FSDP shards one unit each: the base model's transformer blocks, as accelerate's
    TRANSFORMER_BASED_WRAP picks them (the classes ``names``, else those named by FSDP_TRANSFORMER_CLS_TO_WRAP, which
    `accelerate launch` sets from ``fsdp_transformer_layer_cls_to_wrap``, else the model's ``_no_split_modules``:
    LlamaDecoderLayer...); a model that names none (BERT): the members of its longest ModuleList of identical blocks
    (``encoder.layer``)."""
    if not names:
        names = [n.strip() for n in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if n.strip()]
    if not names:
        names = list(getattr(model, "_no_split_modules", None) or [])
    # transformers names the embeddings too (BERT: BertEmbeddings); they stay in the root unit, as in accelerate
    blocks = [m for m in model.modules() if type(m).__name__ in names and "Embedding" not in type(m).__name__]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1
             and len({type(x) for x in m}) == 1 and any(True for _ in m[0].parameters())]
    return list(max(lists, key=len)) if lists else []


def base_param_counts(model: torch.nn.Module, base_ids: set) -> dict:
    """This process's share of the base model's parameters: elements held here (a DTensor's local shard) and in
    the whole model, and the bytes of the distinct storages that hold them here."""
    local = total = 0
    storages = {}
    for p in model.parameters():
        if id(p) not in base_ids and not hasattr(p, "to_local"):  # sharded parameters are new objects (DTensors)
            continue
        t = p.to_local() if hasattr(p, "to_local") else p.data
        local += t.numel()
        total += p.numel()
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return {"base_params_local": local, "base_params_total": total, "base_fraction": local / max(total, 1),
            "base_storage_bytes": sum(storages.values())}


def wrap_fsdp(model: torch.nn.Module, device: torch.device, dist_info: "Distributed", base_ids: set,
              blocks: Optional[list] = None) -> dict:
    """Shard the frozen base model over the processes with FSDP2 (``fully_shard``): one unit per transformer block
    (``blocks``, default `transformer_blocks`), the rest of the base model (embeddings, final norm, head) in the root
    unit, the adapter model itself. Every parameter the adapter adds or trains (adapter layers, hypernetworks and
    their row codes, trained heads) is left out of the sharding (``ignored_params``): it stays whole on every process,
    in the root adapter model where every layer's forward reaches it (HyperAdaLoRA generates each step's tensors once,
    at the root, before the blocks run), and its gradients are averaged over processes by `all_reduce_grads` as DDP
    would. So the rank allocation, checkpoints and the saved adapter see whole tensors, as in one process; only the
    frozen base weights (nearly all of the memory) are 1/N per process. ``model`` is changed in place; returns
    `base_param_counts` after sharding."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    replicated = [p for p in model.parameters() if p.requires_grad or id(p) not in base_ids]
    for p in replicated:  # every process starts from process 0's adapter (as DDP does)
        dist.broadcast(p.data, src=0)
    ignored = set(replicated)
    mesh = init_device_mesh(device.type, (dist_info.world,))
    for block in (transformer_blocks(model) if blocks is None else blocks):
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    model._get_fsdp_state()._lazy_init()  # the root is the adapter model, also for a call that bypasses it (generate)
    return base_param_counts(model, base_ids - {id(p) for p in ignored})


@contextlib.contextmanager
def fsdp_gathered(model: torch.nn.Module):
    """The root unit's parameters gathered (embeddings, head) for code that calls the base model past the root's
    forward (``generate``); the blocks gather their own as they run."""
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def all_reduce_grads(params: list, dist_info: "Distributed") -> None:
    """Average the gradients of ``params`` (whole on every process) over the processes: one all_reduce of one
    flat buffer, then each gradient divided by the world size, as DDP does."""
    grads = [p.grad for p in params if p.grad is not None]
    if dist_info.world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist_info.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
