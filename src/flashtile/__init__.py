"""flashtile: FlashAttention in Python -- Triton kernels behind FlashAttention-2's API."""

from flashtile.interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from flashtile.kvcache import flash_attn_with_kvcache
from flashtile.padding import pad_input, unpad_input
from flashtile.reference import attention_ref, attention_varlen_ref

__version__ = "0.2.0"

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "pad_input",
    "unpad_input",
    "attention_ref",
    "attention_varlen_ref",
    "__version__",
]
