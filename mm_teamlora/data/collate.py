"""Batching: right padding, attention masks, labels, all images of the batch in one tensor."""

from __future__ import annotations

import torch

from ..constants import IGNORE_INDEX
from ..padding import SIDES, pad, pad_ids, pad_token_id, padded_length


class DataCollator:
    """Items of `InstructionDataset` -> a dict of tensors:

    - `input_ids` (B, T): padded with `pad_token_id` on the right (training; `padding_side="left"`
      for batched generation); image placeholders stay
      `IMAGE_PLACEHOLDER_ID` (the model splices image features there),
    - `attention_mask` (B, T) long, 1 on real tokens,
    - `labels` (B, T): `IGNORE_INDEX` on padding, prompts and placeholders,
    - `pixel_values` (total images, C, H, W) in item then placeholder order, or None without images,
    - `image_counts` (B,) long: images per item, to split `pixel_values` back.

    T is the longest item, rounded up to `pad_to_multiple_of` when given. Deterministic: the same
    items give the same tensors.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, padding_side: str = "right"):
        if pad_token_id is None or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a token id, got {pad_token_id!r}")
        if padding_side not in SIDES:
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id, self.pad_to_multiple_of, self.padding_side = pad_token_id, pad_to_multiple_of, padding_side

    @classmethod
    def from_tokenizer(cls, tokenizer, pad_to_multiple_of: int | None = None,
                       padding_side: str = "right") -> "DataCollator":
        """Pads with the tokenizer's pad token, or its EOS when it has none (positions are masked)."""
        return cls(pad_token_id(tokenizer), pad_to_multiple_of, padding_side)

    def __call__(self, items: list[dict]) -> dict:
        length = padded_length([len(item["input_ids"]) for item in items], self.pad_to_multiple_of)
        side = self.padding_side
        input_ids, attention_mask = pad_ids([item["input_ids"] for item in items], self.pad_token_id, side, length)
        labels = pad([item["labels"] for item in items], IGNORE_INDEX, side, length, dtype=torch.long)
        images = [item["pixel_values"] for item in items if item.get("pixel_values") is not None]
        counts = [0 if item.get("pixel_values") is None else len(item["pixel_values"]) for item in items]
        for item, count in zip(items, counts):
            if count != item.get("image_count", count):
                raise ValueError(f"item {item.get('id')!r}: {count} image tensors for {item['image_count']} images")
        if images and len({tuple(x.shape[1:]) for x in images}) > 1:
            shapes = sorted({tuple(x.shape[1:]) for x in images})
            raise ValueError(f"images of different shapes in one batch: {shapes}; "
                             "the image processor must return one fixed size")
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.cat(images) if images else None,
            "image_counts": torch.tensor(counts, dtype=torch.long),
        }
