"""Between padded ``(batch, seqlen, ...)`` tensors and the packed ``(total_tokens, ...)`` form
that ``flash_attn_varlen_func`` takes: FlashAttention-2's ``unpad_input`` / ``pad_input``.
Both are plain differentiable PyTorch ops (gather / scatter of rows)."""

import torch


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """Pack the tokens where ``attention_mask`` is set.

    Arguments:
        hidden_states: (batch, seqlen, ...).
        attention_mask: bool or integer (batch, seqlen), nonzero for real tokens. Any pattern
            works (right or left padding): each row's tokens are packed in order.
        unused_mask: optional (batch, seqlen), tokens that are allocated but not attended to
            (packed too, counted in ``cu_seqlens`` but not in ``seqused``).
    Return:
        hidden_states: (total_tokens, ...), the selected rows.
        indices: int64 (total_tokens,), their positions in the flattened (batch * seqlen) input.
        cu_seqlens: int32 (batch + 1,), for ``flash_attn_varlen_func``.
        max_seqlen_in_batch: int.
        seqused: int32 (batch,), the number of attended tokens per row.
    """
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() < 2:
        raise ValueError("hidden_states must be a tensor of shape (batch, seqlen, ...)")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != hidden_states.shape[:2]:
        raise ValueError(f"attention_mask must have shape (batch, seqlen) = {tuple(hidden_states.shape[:2])}, "
                         f"got {getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    used = attention_mask.bool()
    present = used if unused_mask is None else used | unused_mask.bool()
    seqlens = present.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(present.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    cu_seqlens = torch.zeros(seqlens.shape[0] + 1, dtype=torch.int32, device=seqlens.device)
    cu_seqlens[1:] = torch.cumsum(seqlens, dim=0)
    packed = hidden_states.flatten(0, 1).index_select(0, indices)
    return packed, indices, cu_seqlens, max_seqlen, used.sum(dim=-1, dtype=torch.int32)


def pad_input(hidden_states, indices, batch, seqlen):
    """Inverse of ``unpad_input``: (total_tokens, ...) -> (batch, seqlen, ...), zeros at padding."""
    if hidden_states.shape[0] != indices.shape[0]:
        raise ValueError(f"hidden_states has {hidden_states.shape[0]} rows but indices has {indices.shape[0]}")
    padded = hidden_states.new_zeros((batch * seqlen, *hidden_states.shape[1:]))
    padded = padded.index_put((indices,), hidden_states)
    return padded.reshape(batch, seqlen, *hidden_states.shape[1:])
