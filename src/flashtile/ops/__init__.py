"""Triton kernels and their host launchers. Launchers take and return plain tensors;
they know nothing of autograd or argument validation (interface.py does that)."""

from flashtile.ops.bwd import flash_bwd
from flashtile.ops.fwd import flash_fwd

__all__ = ["flash_fwd", "flash_bwd"]
