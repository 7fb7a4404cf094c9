"""The torchrun process group: joining it, this process's rank/world/device, batch shares and the DDP wrapper.

Everything degrades to a plain single-process run when no process group exists.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

BACKENDS = ("nccl", "gloo")

__all__ = ["BACKENDS", "barrier", "check_batch_divisible", "init_distributed", "is_distributed", "is_main_process",
           "local_device", "rank", "unwrap_model", "world_size", "wrap_ddp"]


def init_distributed(backend: Optional[str] = None, timeout_s: float = 1800.0) -> bool:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT); with CUDA, also select the GPU ``LOCAL_RANK``.

    Args:
        backend: 'nccl' or 'gloo'; None picks NCCL when CUDA is available, gloo otherwise.
        timeout_s: collective timeout in seconds.

    Returns:
        True when a process group is active (already or now), False outside torchrun (single process).
    """
    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA GPUs; use backend='gloo' on CPUs")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    device = None
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                            device_id=device if backend == "nccl" else None)
    return True


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 outside a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one that logs, plots and writes checkpoints."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if is_distributed():
        dist.barrier()


def local_device() -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _comm_device() -> torch.device:
    """Where collective buffers must live: the GPU for NCCL, the CPU for gloo."""
    return local_device() if dist.get_backend() == "nccl" else torch.device("cpu")


def _rank_and_world(own: Optional[int], world: Optional[int]) -> tuple:
    """(rank, world) with the current group's values filling the Nones, validated."""
    world = world_size() if world is None else world
    own = rank() if own is None else own
    if world < 1 or not 0 <= own < world:
        raise ValueError(f"need world >= 1 and rank in [0, world), got rank={own}, world={world}")
    return own, world


def check_batch_divisible(batch: int, world: Optional[int] = None, name: str = "batch size") -> int:
    """Per-rank share of a global batch.

    Args:
        batch: global batch size.
        world: number of processes (default the current world size).
        name: what ``batch`` is, for the error message.

    Returns:
        ``batch // world``. Raises ValueError when ``world`` does not divide ``batch``.
    """
    world = world_size() if world is None else world
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"{name} must be a positive int, got {batch!r}")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world size must be a positive int, got {world!r}")
    if batch % world:
        raise ValueError(f"{name} {batch} is not divisible by the world size {world}: the global batch is split "
                         f"evenly over the processes; use a multiple of {world}")
    return batch // world


def wrap_ddp(model: nn.Module, find_unused_parameters: bool = True, **ddp_kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` inside a process group, ``model`` itself otherwise.

    Args:
        model: the model, already on its device (``local_device()``) with its final ``requires_grad`` flags.
        find_unused_parameters: needed when some trainable parameters get no gradient in a step (e.g. the old
            heads of ``ExperienceHeads`` in training mode).
        ddp_kwargs: further DistributedDataParallel arguments.

    Buffers of modules that set ``ddp_ignore_buffers = True`` (e.g. the fitted heads' class statistics, identical
    on every rank and possibly large) are left out of DDP's per-step buffer broadcast.
    """
    if not is_distributed():
        return model
    ignored = [f"{name}.{buffer}" if name else buffer for name, module in model.named_modules()
               if getattr(module, "ddp_ignore_buffers", False) for buffer, _ in module.named_buffers(recurse=False)]
    if ignored:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    device = next(model.parameters(), torch.zeros(())).device
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters,
                                   **ddp_kwargs)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (``model`` itself when not wrapped)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
