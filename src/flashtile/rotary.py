"""Rotary position embeddings (RoPE) in plain PyTorch: the definition the kernels follow.

``flash_attn_with_kvcache`` rotates the first ``rotary_dim`` dims of q and of the new keys by
the angles in ``cos``/``sin`` of shape ``(seqlen_ro, rotary_dim / 2)``; the other dims pass
through. Pairs are ``(2t, 2t + 1)`` when ``interleaved`` (GPT-J) and ``(t, t + rotary_dim / 2)``
otherwise (GPT-NeoX); pair ``t`` of a token at position ``p`` turns by ``cos[p, t]``,
``sin[p, t]``::

    x'[first]  = x[first] * cos - x[second] * sin
    x'[second] = x[first] * sin + x[second] * cos

Computed in float32 and rounded once to the input dtype (as FlashAttention-2 does); the CPU
path uses this function, the tests use it (in float64) as the oracle.
"""

import torch


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 interleaved: bool, compute_dtype=torch.float32) -> torch.Tensor:
    """``x`` (B, S, H, D) rotated at ``positions`` (B, S) (integer indices into cos/sin rows).

    Returns a new tensor in x's dtype; arithmetic in ``compute_dtype``."""
    rotary_dim = 2 * cos.shape[-1]
    angles_cos = cos.to(compute_dtype)[positions.long()][:, :, None, :]  # (B, S, 1, rotary_dim / 2)
    angles_sin = sin.to(compute_dtype)[positions.long()][:, :, None, :]
    rotated = x[..., :rotary_dim].to(compute_dtype)
    if interleaved:
        first, second = rotated[..., 0::2], rotated[..., 1::2]
    else:
        first, second = rotated[..., :rotary_dim // 2], rotated[..., rotary_dim // 2:]
    new_first = first * angles_cos - second * angles_sin
    new_second = first * angles_sin + second * angles_cos
    if interleaved:
        rotated = torch.stack((new_first, new_second), dim=-1).flatten(-2)
    else:
        rotated = torch.cat((new_first, new_second), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)
