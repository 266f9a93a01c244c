"""Several processes, one run: thin helpers over ``torch.distributed`` as torchrun sets it up.

:func:`init_from_env` joins the process group torchrun describes in the
environment (or does nothing in a single process); the rest are the few
collective operations, shard computations and checks the library needs.
How the work is divided among ranks (data-parallel training, one rank per
evaluated point, what only rank 0 writes) is explained once, in the README
section "Multiple GPUs and machines".
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` (``local_rank`` on its machine)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None  # None: no process group (a single process)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files, logs and progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when there are several processes to coordinate."""
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher with the same contract) set RANK, WORLD_SIZE, LOCAL_RANK."""
    return all(k in os.environ for k in ENV)


def _device(name: Optional[str], local_rank: int, world_size: int) -> torch.device:
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if world_size > 1 or launched_by_torchrun():
            if dev.index is not None and dev.index != local_rank:
                raise ValueError(f"--device {name}: under torchrun each process uses cuda:LOCAL_RANK "
                                 f"(here cuda:{local_rank}); pass --device cuda or auto")
            dev = torch.device("cuda", local_rank)
    return dev


def init_from_env(backend: Optional[str] = None, device: Optional[str] = None) -> DistInfo:
    """Join the process group torchrun describes in the environment, or run alone.

    Args:
        backend: ``"gloo"``, ``"nccl"`` or ``None`` / ``"auto"``: nccl when the
            device is CUDA, gloo otherwise.
        device: ``"cpu"``, ``"cuda"`` or ``None`` / ``"auto"`` (CUDA when
            available). Under torchrun a CUDA process uses ``cuda:LOCAL_RANK``
            and makes it the current device.

    Without RANK / WORLD_SIZE / LOCAL_RANK in the environment no process
    group is created and ``DistInfo(rank=0, world_size=1)`` is returned.
    Calling it again returns the group already joined.
    """
    if backend not in (None, *BACKENDS):
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if not launched_by_torchrun():
        return DistInfo(device=_device(device, 0, 1))
    rank, world, local = (int(os.environ[k]) for k in ENV)
    dev = _device(device, local, world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if backend in (None, "auto"):
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("--backend nccl needs CUDA devices; use gloo on the CPU")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, device=dev,
                    backend=dist.get_backend())


def is_initialized() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return get_rank() == 0


def active() -> bool:
    """True inside a process group of more than one process."""
    return get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _comm_device() -> torch.device:
    """Where tensors must live for the current backend's collectives."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (a new tensor on the input's device; the input itself if alone)."""
    if not active():
        return tensor
    t = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(tensor.device)


def all_gather_tensor(tensor: torch.Tensor) -> List[torch.Tensor]:
    """Every rank's ``tensor`` (same shape and dtype on all ranks), in rank order."""
    if not active():
        return [tensor]
    t = tensor.detach().to(_comm_device()).contiguous()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.to(tensor.device) for o in out]


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in a single process)."""
    if not active():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers into every rank's ``module`` (once; DDP's own sync covers parameters)."""
    if not active():
        return
    dev = _comm_device()
    for b in module.buffers():
        t = b.to(dev, copy=True) if b.device != dev else b
        dist.broadcast(t, src=src)
        if t is not b:
            b.copy_(t)


def cleanup(wait_for_peers: bool = False) -> None:
    """Leave the process group (no-op when none was joined).

    ``wait_for_peers``: meet every rank at a barrier first, so that no rank
    tears its connections down while another (rank 0 writing the results) is
    still in the group. Only for a normal end: after an error a peer may never
    arrive.
    """
    if is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()


def per_rank_batch(global_batch: int, world_size: Optional[int] = None) -> int:
    """The per-process share of a global batch; it must divide evenly."""
    world = get_world_size() if world_size is None else int(world_size)
    if global_batch < 1:
        raise ValueError(f"batch size must be >= 1, got {global_batch}")
    if global_batch % world:
        raise ValueError(f"--batch-size {global_batch} is the global batch (all processes together) and must "
                         f"be divisible by the number of processes ({world}); e.g. "
                         f"{max(world, global_batch - global_batch % world)}")
    return global_batch // world


def shard(n: int, rank: Optional[int] = None, world_size: Optional[int] = None) -> Tuple[int, int]:
    """Contiguous share ``[lo, hi)`` of ``n`` items for ``rank`` (sizes differ by at most one)."""
    rank = get_rank() if rank is None else int(rank)
    world = get_world_size() if world_size is None else int(world_size)
    base, extra = divmod(int(n), world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def rank_seed(seed: int, epoch: int, rank: Optional[int] = None) -> int:
    """A seed for rank-specific randomness (dropout) in one epoch of a run."""
    rank = get_rank() if rank is None else int(rank)
    return (int(seed) * 1_000_003 + int(epoch) * 9_973 + 7_919 * (rank + 1) + 12_345) % (2**63 - 1)


def wrap_ddp(module: nn.Module, sync_buffers_every_step: bool = True, **kwargs) -> nn.Module:
    """``DistributedDataParallel(module)`` on the module's device (CPU: gloo, no device_ids).

    Parameters and buffers are copied from rank 0 when it is built. With
    ``sync_buffers_every_step=False`` buffers are not broadcast again before
    every forward (DDP's ``forward_sync_buffers=False``; on older PyTorch
    ``broadcast_buffers=False`` after one broadcast of our own).
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    p = next(module.parameters())
    kwargs["device_ids"] = [p.device.index] if p.device.type == "cuda" else None
    if not sync_buffers_every_step:
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
            kwargs["forward_sync_buffers"] = False
        else:  # older PyTorch: broadcast_buffers=False also skips the initial sync
            broadcast_buffers(module)
            kwargs["broadcast_buffers"] = False
    return DistributedDataParallel(module, **kwargs)


def check_same(value: float, what: str) -> None:
    """Raise when ranks disagree on ``value`` (a float every rank must have computed identically)."""
    if not active():
        return
    values = [float(v) for v in all_gather_tensor(torch.tensor([float(value)], dtype=torch.float64))]
    if any(v != values[0] for v in values):
        raise RuntimeError(f"ranks disagree on {what}: {values}")


def check_sharded(loader: Any) -> None:
    """A ``TensorLoader`` used under DDP must be sharded for this process group."""
    if not active():
        return
    ws = getattr(loader, "world_size", None)
    rk = getattr(loader, "rank", None)
    if ws is not None and (int(ws) != get_world_size() or int(rk) != get_rank()):
        raise ValueError(f"the training loader is sharded for rank {rk} of {ws}, but this is rank "
                         f"{get_rank()} of {get_world_size()}: build it with rank=..., world_size=... "
                         "(each rank must see its own share of every global batch)")


__all__ = ["DistInfo", "init_from_env", "launched_by_torchrun", "is_initialized", "get_rank", "get_world_size",
           "is_main", "active", "barrier", "all_reduce_sum", "all_gather_tensor", "all_gather_object",
           "broadcast_object", "broadcast_buffers", "cleanup", "per_rank_batch", "shard", "rank_seed",
           "wrap_ddp", "check_same", "check_sharded"]
