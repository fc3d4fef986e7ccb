"""Multi-process generation over torch.distributed (gloo on CPU, NCCL on GPU)."""

from streamrt.parallel.rows import RowParallel

__all__ = ["RowParallel"]
