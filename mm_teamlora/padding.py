"""Rows of different lengths as one padded batch: the collator (token ids, labels), the evaluation
(prompts) and the multimodal model (spliced embeddings, labels, token groups) pad the same way.

Below the model, data and eval rooms, which all need it (torch only).
"""

from __future__ import annotations

from typing import Sequence

import torch

SIDES = ("right", "left")


def pad_token_id(tokenizer, default: int | None = None) -> int | None:
    """The id padding positions hold: the tokenizer's pad token, else its EOS (the positions are
    masked, so any id serves), else `default`."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return value
    return default


def padded_length(lengths: Sequence[int], multiple_of: int | None = None) -> int:
    """The longest length, rounded up to `multiple_of` when given."""
    length = max(lengths)
    return -(-length // multiple_of) * multiple_of if multiple_of else length


def pad(rows: Sequence, value, side: str = "right", length: int | None = None,
        dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows (tensors or lists, shapes `(n_i, *rest)`) stacked into `(len(rows), length, *rest)`,
    each row on `side` and `value` elsewhere; on the first row's device, in `dtype` (default the
    first row's). `length` defaults to the longest row."""
    if side not in SIDES:
        raise ValueError(f"padding side must be 'right' or 'left', got {side!r}")
    rows = [torch.as_tensor(r) for r in rows]
    length = padded_length([r.shape[0] for r in rows]) if length is None else length
    first = rows[0]
    out = torch.full((len(rows), length, *first.shape[1:]), value, dtype=dtype or first.dtype, device=first.device)
    for i, row in enumerate(rows):
        out[i, _span(row.shape[0], length, side)] = row
    return out


def padding_mask(lengths: Sequence[int], length: int | None = None, side: str = "right",
                 device=None) -> torch.Tensor:
    """The attention mask of `pad`'s output: `(len(lengths), length)` long, 1 on real positions."""
    length = padded_length(lengths) if length is None else length
    mask = torch.zeros(len(lengths), length, dtype=torch.long, device=device)
    for i, n in enumerate(lengths):
        mask[i, _span(n, length, side)] = 1
    return mask


def pad_ids(rows: Sequence, pad_id: int, side: str = "right", length: int | None = None,
            device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows as `(input_ids, attention_mask)`, both `(len(rows), length)` long, on `device`."""
    lengths = [len(r) for r in rows]
    length = padded_length(lengths) if length is None else length
    ids = pad(rows, pad_id, side, length, dtype=torch.long)
    return ids.to(device), padding_mask(lengths, length, side, ids.device if device is None else device)


def _span(n: int, length: int, side: str) -> slice:
    return slice(0, n) if side == "right" else slice(length - n, length)
