"""flashtile: FlashAttention in Python -- Triton kernels behind FlashAttention-2's API."""

from flashtile.interface import flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from flashtile.reference import attention_ref

__version__ = "0.1.0"

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "attention_ref",
    "__version__",
]
