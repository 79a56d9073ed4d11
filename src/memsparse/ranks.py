"""The ranks of a distributed launch (`torchrun --nproc_per_node N -m memsparse.cli ...`) for the command line:
detecting one, joining its process group (gloo on CPUs; on GPUs NCCL for CUDA tensors, gloo for CPU ones), a
one-rank group for a bank over ranks opened without a launch, and rank 0 holding a bank's write lock for all ranks.
Imports torch only when a group is used (the command line starts without it)."""

from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta
from pathlib import Path

# collectives wait this long for a missing rank (the server's other ranks idle between requests: serve/parallel.py)
TIMEOUT = timedelta(minutes=30)


def launched() -> bool:
    """Whether this process is one of several ranks of a distributed launch (WORLD_SIZE > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's rank: in its process group once joined, else in the environment (0 without a launch)."""
    dist = sys.modules.get("torch.distributed")
    return dist.get_rank() if dist is not None and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def device(asked: str | None) -> str:
    """The device of this rank: --device, where 'cuda' (or nothing, on a machine with GPUs) means this rank's own GPU
    (LOCAL_RANK) under a launch."""
    import torch

    if asked in (None, "cuda") and torch.cuda.is_available():
        if not launched():
            return "cuda"
        local, n = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= n:
            raise ValueError(f"local rank {local} has no GPU of its own ({n} visible): launch at most {n} ranks per "
                             "host, or pass --device cpu")
        return f"cuda:{local}"
    return asked or "cpu"


def backend(dev: str) -> str:
    """gloo on CPUs; on GPUs NCCL for CUDA tensors and gloo for CPU ones (the objects `share` sends)."""
    return "cpu:gloo,cuda:nccl" if dev.startswith("cuda") else "gloo"


@contextlib.contextmanager
def group(dev: str):
    """The process group of this launch (joined here from torchrun's environment unless already joined, and left
    when the block ends), or a one-rank group without a launch (a bank over ranks opened by one process)."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if dist.get_world_size() != world:
            raise ValueError(f"the process group has {dist.get_world_size()} ranks, WORLD_SIZE says {world}")
        yield
        return
    d = torch.device(dev)
    if d.type == "cuda" and d.index is not None:
        torch.cuda.set_device(d)
    if launched():
        dist.init_process_group(backend(dev), timeout=TIMEOUT)  # torchrun's MASTER_ADDR, MASTER_PORT, RANK
    else:
        dist.init_process_group(backend(dev), store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def locked(path: str | Path, wait: float | None = None):
    """Rank 0 holds the bank directory's write lock (memory/store.py's `writer`) from before any rank reads the bank
    until every rank is done with it (collective; when rank 0 cannot take it, every rank raises its BankBusy)."""
    import torch.distributed as dist

    from .memory.store import BankError, writer

    with contextlib.ExitStack() as stack:
        busy = None
        if dist.get_rank() == 0:
            try:
                stack.enter_context(writer(path, wait))
            except BankError as e:
                busy = e
        busy = share(busy)
        if busy is not None:
            raise busy
        try:
            yield
        finally:
            dist.barrier()


def share(obj):
    """Rank 0's `obj` on every rank (collective)."""
    import torch
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    return box[0]
