"""Starting a process group: under `torchrun` (env vars) or locally (`spawn`, tests, bench)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from streamrt.errors import StreamrtError
from streamrt.parallel.rows import RowParallel


def backend_for(device: str | torch.device | None) -> str:
    """NCCL for CUDA devices, gloo otherwise."""
    kind = torch.device(device).type if device is not None else "cpu"
    return "nccl" if kind == "cuda" else "gloo"


class LaunchError(StreamrtError, RuntimeError):
    """A parallel run was started without the process group it needs."""


def init_from_env(device: str | None = None) -> RowParallel:
    """Join the group `torchrun` describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    missing = [
        k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
    ]
    if missing:
        raise LaunchError(
            f"--parallel needs a process group, but {', '.join(missing)} is not set: launch "
            "with `torchrun --nproc_per_node=N -m streamrt.apps.cli ...`"
        )
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device))
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return RowParallel()


def leave_group() -> None:
    """Wait for every rank, then tear the group down (a no-op outside one). A rank that
    simply exits while its peer still works leaves gloo's threads running, and the C++
    runtime aborts it ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def parallelize(generator: Any, parallel: RowParallel) -> Any:
    """Split the rows of every forward of `generator` (a `StreamGenerator`) over the group."""
    generator.engine.parallel = parallel
    return generator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        leave_group()  # a rank done first must not tear gloo down under a working peer
    finally:
        if dist.is_initialized():  # failed: tear down without waiting for the others
            dist.destroy_process_group()


def run_local(fn: Callable, world: int, *args: Any) -> None:
    """Run `fn(rank, world, *args)` in `world` new processes joined by a gloo group on
    127.0.0.1 (for tests and `streamrt bench pipeline`); raises if any of them fails.
    `fn` must be importable (a module-level function)."""
    mp.spawn(_worker, args=(world, free_port(), fn, args), nprocs=world, join=True)
