"""Copies between tiers: asynchronous on CUDA (side stream + pinned host memory), plain on CPU."""

from __future__ import annotations

import torch


class Transfer:
    """Handle of one tier move. `wait()` blocks the host until the bytes have landed."""

    __slots__ = ("event", "nbytes")

    def __init__(self, event: torch.cuda.Event | None, nbytes: int) -> None:
        self.event = event
        self.nbytes = nbytes

    def done(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class Copier:
    """Issues device<->host copies.

    On CUDA a copy runs on a side stream and the compute stream is made to wait for it
    (`wait_event`), so later kernels see the data while the host thread goes on. A host
    page with a copy in flight must not be touched by the CPU: `sync_host(block_id)`
    waits for that page's last copy before any CPU-side read or write (disk I/O, reuse).
    """

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.device = device
        self._pending_host: dict[int, torch.cuda.Event] = {}

    def copy(
        self, dst: torch.Tensor, src: torch.Tensor, host_block_id: int | None = None
    ) -> Transfer:
        nbytes = src.numel() * src.element_size()
        cuda = self.stream is not None and (dst.is_cuda or src.is_cuda)
        if not cuda:
            dst.copy_(src)
            return Transfer(None, nbytes)
        assert self.stream is not None
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)  # the source was written on the compute stream
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        compute.wait_event(event)
        if host_block_id is not None:
            self._pending_host[host_block_id] = event
        return Transfer(event, nbytes)

    def sync_host(self, host_block_id: int) -> None:
        event = self._pending_host.pop(host_block_id, None)
        if event is not None:
            event.synchronize()
