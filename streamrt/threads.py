"""How many torch intra-op threads a command runs with.

torch's own default (one thread per core) made `streamrt generate` 12x slower than one
thread on a loaded 2-core machine: the tiny models' matmuls are too small to split, and
the threads fight other processes for the cores. Measured on this project's 2-core CPU
(tiny-world, 64x64, 96 frames, three alternating runs each, 2026-12-06):

| other busy processes | 1 thread (fps) | 2 threads (fps) |
|---|---|---|
| about one (other jobs) | 58-59 | 65-74 |
| 1 (a spin loop) | 29-64 | 1.4-4.9 |
| 2 (spin loops) | 13-38 | 1.0-2.2 |

Two threads win 1.2x on an idle machine and lose 10-40x under load, so commands default
to `default_threads()` = 1; `--threads N` or the environment variable `STREAMRT_THREADS`
choose otherwise (on a dedicated many-core CPU, more threads pay for large models).
"""

from __future__ import annotations

import os

from streamrt.errors import InputError

ENV = "STREAMRT_THREADS"


def default_threads() -> int:
    """Threads when `--threads` is not given: `$STREAMRT_THREADS` if set, else 1."""
    value = os.environ.get(ENV, "").strip()
    return parse_threads(value, ENV) if value else 1


def parse_threads(value: str | int, what: str = "--threads") -> int:
    """`value` as a thread count >= 1, or an `InputError` naming `what`."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a whole number of threads >= 1, got {value!r}") from None
    if n < 1:
        raise InputError(f"{what} must be >= 1 (torch threads), got {n}")
    return n


def thread_target(target):
    """`target` wrapped to run with the calling thread's torch thread count. OpenMP's count
    is per OS thread: a new thread starts with OpenMP's default (one per core) until torch's
    first parallel op applies its own setting, and a decode thread started that way ran
    3.7x slower next to the denoising thread on this 2-core CPU (`streamrt/gen/decoding.py`);
    setting it first leaves nothing to chance."""
    import torch

    threads = torch.get_num_threads()

    def run(*args, **kwargs):
        torch.set_num_threads(threads)
        return target(*args, **kwargs)

    return run
