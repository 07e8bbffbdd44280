"""Multi-GPU (DDP) helpers. A single process is the normal case and costs nothing here.

Under ``torchrun`` (env RANK / WORLD_SIZE / LOCAL_RANK set) ``init`` starts the process group (NCCL on
CUDA, gloo on CPU) and pins each process to its GPU; ``wrap`` puts the transformer in
DistributedDataParallel. Only rank 0 writes files (checkpoints, metrics, plots, previews); every
rank must still take part in the collective calls below, or the others wait forever.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """What torchrun told this process (a single process when the variables are absent)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size())
    return DistInfo()


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → this process's GPU (cuda:LOCAL_RANK) if CUDA is present, else the CPU. ``cuda`` or
    ``cuda:N`` without CUDA, or N beyond the GPUs there are, is a ConfigError (one line), not the
    traceback torch would give at the first tensor moved there."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", env_info().local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        raise ConfigError(f"device '{name}' asked for, but CUDA is not available here (torch {torch.__version__} "
                          f"{build}, no usable GPU); use --device cpu or auto.")
    count = torch.cuda.device_count()
    if device.index is None:
        device = torch.device("cuda", env_info().local_rank % count)
    elif device.index >= count:
        raise ConfigError(f"device '{name}' asked for, but this machine has {count} GPU(s) "
                          f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}); pick one of them or use auto.")
    return device


def init(device: torch.device | str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Start the process group when launched by torchrun with WORLD_SIZE > 1; no-op otherwise."""
    env = env_info()
    if env.world_size <= 1 or (dist.is_available() and dist.is_initialized()):
        return info()
    device = resolve_device(device) if isinstance(device, str) else device
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return info()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """DDP-wrap ``model`` when running distributed (else return it unchanged).

    find_unused_parameters=True is the official strategy (ddp_find_unused_parameters_true): a
    trainable parameter may get no gradient in a step (e.g. LoRA on the SSL path when a batch has no
    SSL targets) and DDP would otherwise wait for it forever. DDP broadcasts rank 0's weights at
    construction, so every rank starts from the same LoRA init.
    """
    if not info().enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and hasattr(model, "no_sync") else model


def barrier() -> None:
    if info().enabled:
        dist.barrier()


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """Mean of a small tensor over all ranks (for logging); unchanged in a single process."""
    if not info().enabled:
        return values
    values = values.detach().clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / dist.get_world_size()


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True if ``flag`` is true on any rank, so that every rank stops at the same step."""
    if not info().enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device or "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] in a single process)."""
    if not info().enabled:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
