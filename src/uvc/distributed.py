"""Data-parallel runs under torchrun: the process group, rank queries, collectives, DDP wrapping.

How the ranks stay identical. DistributedDataParallel keeps the weights identical: it starts every
rank from rank 0's weights and averages the weight gradients, so every rank takes the same
optimizer step. Everything else the search updates is a deterministic function of those weights
and of search state that is itself already identical:
- Phi, the next group's norm and the masks are computed from the weights and the Taylor estimates;
- the allocation step uses z, the Taylor estimates and dR; the dual steps use Phi, the estimates and R;
- the Taylor estimates use the gradients of the loss with respect to the masks and keep values.
Only those last gradients depend on the rank's own batch, so they are the values that are all-reduced
(averaged, like DDP averages weight gradients); nothing is broadcast, and no rank is special.
`same_on_all_ranks` checks the outcome at every checkpoint instead of trusting it.

Every rank seeds its generators alike, so the draws that a single process makes once per batch
(mixup's lambda) are the same on every rank, as they would
be for one process on the whole batch. The ranks' data differs through disjoint shards. Identity
of the search state does not depend on this: it holds with per-rank samples too.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .errors import UVCError


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group once (env:// rendezvous) and return this rank's device.

    Each rank gets its own GPU, `cuda:LOCAL_RANK`, and the NCCL backend; CPU runs use gloo.
    Outside torchrun this changes nothing.
    """
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not active():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo reduces CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average `tensor` over the ranks, in place."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(world_size())
    return tensor


def sum_over_ranks(*values: float) -> list[float]:
    """Sums of a few numbers over the ranks (counts of correct and total predictions, ...)."""
    if world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def mean_over_ranks(value: float) -> float:
    return sum_over_ranks(value)[0] / world_size()


def broadcast_from_main(obj):
    """Rank 0's `obj` on every rank (any picklable object)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def same_on_all_ranks(what: str, tensors: Iterable[torch.Tensor]) -> None:
    """Raise on every rank if `tensors` are not bit-identical on all of them."""
    if world_size() == 1:
        return
    local = torch.cat([t.detach().reshape(-1).to(_collective_device(), torch.float64) for t in tensors])
    gathered = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(gathered, local)
    differing = [r for r, t in enumerate(gathered) if not torch.equal(t, gathered[0])]
    if differing:
        raise UVCError(f"{what} differs between rank 0 and rank(s) {differing}: the ranks have diverged; "
                       "please report this as a bug")


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (a download fills the cache), then the other ranks run it."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP around `model` when there are several ranks, else the model itself.

    Buffers are not synchronised at every forward pass: the only buffers of a compressible model
    are its masks, which every rank recomputes identically from the weights (and
    `same_on_all_ranks` checks), so a broadcast would cost a collective per step and hide a bug.
    The switch is `forward_sync_buffers` from torch 2.14 on; the CUDA images that ship an older
    torch know it as `broadcast_buffers`.
    """
    if world_size() == 1:
        return model
    switch = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
              else "broadcast_buffers")
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   **{switch: False})
