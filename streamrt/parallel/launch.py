"""Starting a process group: under `torchrun` (env vars) or locally (`spawn`, tests, bench)."""

from __future__ import annotations

import datetime
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from streamrt.errors import StreamrtError


def backend_for(device: str | torch.device | None) -> str:
    """NCCL for CUDA devices, gloo otherwise."""
    kind = torch.device(device).type if device is not None else "cpu"
    return "nccl" if kind == "cuda" else "gloo"


DEFAULT_TIMEOUT_S = 120.0


class LaunchError(StreamrtError, RuntimeError):
    """A parallel run was started without the process group it needs."""


class PipelineError(StreamrtError, RuntimeError):
    """A rank of a pipeline failed, or waited too long for its neighbour."""


def wait_for(work, timeout: float, what: str, rank: int, peer: int, where: str = "") -> None:
    """Wait for a point-to-point `work` at most `timeout` s; a dead, failed or stalled peer
    raises `PipelineError` naming `peer` (`what`: e.g. "rank 1: receiving latents from")."""
    try:
        ok = work.wait(datetime.timedelta(seconds=timeout))
    except Exception as e:  # gloo raises on a timeout or a closed peer connection
        raise PipelineError(
            f"{what} rank {peer} failed{where} (rank {peer} died, raised or stalled past "
            f"{timeout:g} s): {e}"
        ) from e
    if ok is False:
        raise PipelineError(f"{what} rank {peer} did not complete within {timeout:g} s{where}")


def check_same(rank: int, world: int, mine: Any, group, what: str) -> None:
    """Every rank must pass equal `mine` (else the ranks would compute different streams)."""
    every: list[Any] = [None] * world
    dist.all_gather_object(every, mine, group=group)
    for r, theirs in enumerate(every):
        if theirs != every[0]:
            raise PipelineError(
                f"rank {r} runs different {what} than rank 0 ({theirs} vs {every[0]}): every "
                f"rank of a pipeline needs the same {what}"
            )


def init_from_env(device: str | None = None) -> None:
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
        # A collective waiting on a dead rank fails after this long (gloo's default: 30 min).
        timeout = datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
        dist.init_process_group(backend_for(device), timeout=timeout)
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def leave_group() -> None:
    """Wait for every rank, then tear the group down (a no-op outside one). A rank that
    simply exits while its peer still works leaves gloo's threads running, and the C++
    runtime aborts it ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pipeline_worker(
    rank: int, world: int, port: int, timeout: float, fn: Callable, args: tuple, errors
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout)
    )
    try:
        fn(rank, world, *args)
        dist.barrier()  # a rank done first must not tear gloo down under a working peer
    except BaseException as e:
        # Short enough for one atomic pipe write (a peer may be stopped mid-write).
        errors.put((rank, f"{type(e).__name__}: {e}"[:1000], traceback.format_exc()[-2000:]))
        os._exit(1)  # skip gloo's teardown, which may wait on the peers
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _from_a_peer(message: str) -> bool:
    """An error that only reports a peer going away: a timeout waiting on it
    (`PipelineError`), or gloo's transport seeing its connection closed or reset."""
    return "PipelineError" in message or "gloo/transport" in message


def run_pipeline_local(
    fn: Callable, world: int, *args: Any, timeout: float = DEFAULT_TIMEOUT_S
) -> None:
    """`fn(rank, world, *args)` in `world` new processes joined by a gloo group on
    127.0.0.1 whose operations time out after `timeout` s (tests, `streamrt bench
    pipeline`). A rank that raises ends the run: the other ranks are stopped and
    `PipelineError` names the rank that failed first (the one whose error does not come
    from waiting on a peer) and its error. `fn` must be importable (module level)."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_pipeline_worker, args=(r, world, port, timeout, fn, args, errors))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    failed = []
    try:
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(0.05)
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:  # a moment for the peers to report what they saw
                    p.join(2.0)
                break
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
        while not errors.empty():
            failed.append(errors.get())
    if failed:
        own = [f for f in failed if not _from_a_peer(f[1])] or failed
        rank, msg, tb = min(own)
        raise PipelineError(f"pipeline: rank {rank} failed: {msg}\n{tb}")
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise PipelineError(f"pipeline: rank {bad[0][0]} exited with code {bad[0][1]}")
