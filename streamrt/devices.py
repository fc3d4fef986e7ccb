"""Resolve a configured device name, refusing one this machine does not have."""

from __future__ import annotations

import torch

from streamrt.errors import InputError


def resolve_device(name: str | None, what: str = "device") -> torch.device:
    """`name` ("cuda", "cuda:1", "cpu", None: CUDA if available, else CPU) as a device.

    Raises:
        InputError: the name is not a device, or names CUDA on a machine without it (or
            a GPU index it does not have), saying which `what` setting to change.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InputError(f"{what}: {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"{what} is {name!r} but this machine has no usable CUDA GPU (torch "
                f"{torch.__version__}); set it to cpu, or leave it out to pick automatically"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(
                f"{what} is {name!r} but this machine has {torch.cuda.device_count()} GPU(s) "
                "(cuda:0 ...)"
            )
    return device
