"""The segment rows of `segment_attention.plan_segments` for the GPU attention kernels: a FlexAttention
`BlockMask` (packing and prompt sharing) and flash attention's varlen arguments (packing alone).

`training/layout.py` builds these once per micro-batch for the FLEX and VARLEN layouts; the rule of which
token sees which is `packed_attention`'s (a token attends causally within its sequence, a branch token only to
the prefix and its own branch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .packed_attention import SHARED


def segment_ids(
    segments: Sequence[Sequence[int]], length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sequence_id, kind)` `[L]` of a segment row (`plan_segments` describes its rows): each token's sequence
    (-1 for tokens past the last sequence) and its kind (0 for the prefix, i for branch i).

    >>> segment_ids([(0, 2, 1, 2), (5, 3, 0, 0)], 8, torch.device("cpu"))[1].tolist()
    [0, 0, 1, 2, 2, 0, 0, 0]
    """
    sequence_id = torch.full((length,), -1, dtype=torch.long)
    kind = torch.zeros(length, dtype=torch.long)
    for index, (start, prefix, *branches) in enumerate(segments):
        end = start + prefix
        sequence_id[start:end] = index
        for branch, branch_length in enumerate(branches, start=1):
            sequence_id[end : end + branch_length] = index
            kind[end : end + branch_length] = branch
            end += branch_length
    return sequence_id.to(device), kind.to(device)


def segment_block_mask(segments: Sequence[Sequence[int]], length: int, device: torch.device):
    """A FlexAttention `BlockMask` `[1, 1, L, L]` of a segment row, built once per micro-batch: a token attends
    causally within its sequence, a branch token only to the prefix and its own branch (`packed_attention_mask`'s
    rule). transformers hands a `BlockMask` given as `attention_mask` to its flex_attention backend as is
    (`masking_utils._preprocess_mask_arguments`), which also applies the backbone's softcapping and GQA."""
    from torch.nn.attention.flex_attention import create_block_mask

    sequence_id, kind = segment_ids(segments, length, device)

    def attends(batch, head, query, key):
        same_sequence = (sequence_id[query] == sequence_id[key]) & (sequence_id[query] >= 0)
        return same_sequence & (query >= key) & ((kind[key] == SHARED) | (kind[key] == kind[query]))

    return create_block_mask(attends, None, None, length, length, device=device)


def varlen_kwargs(segments: Sequence[Sequence[int]], device: torch.device) -> dict[str, torch.Tensor | int]:
    """Flash attention's varlen arguments for a row of unshared sequences (`DataCollatorWithFlattening`'s names):
    cumulative sequence starts and the longest sequence, computed on the host so the kernel needs no sync."""
    lengths = [prefix + sum(branches) for _, prefix, *branches in segments]
    if any(any(branches) for _, _, *branches in segments):
        raise ValueError("flash attention's varlen path takes unshared sequences only (no prompt branches)")
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    longest = max(lengths)
    return {
        "cu_seq_lens_q": starts,
        "cu_seq_lens_k": starts,
        "max_length_q": longest,
        "max_length_k": longest,
    }
