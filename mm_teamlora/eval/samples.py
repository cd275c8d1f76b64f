"""One question or conversation as the model sees it: what the routing report records and the
expert-masking test scores (`routing`, `ablation`; its own module so neither imports the other)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..constants import IMAGE_PLACEHOLDER_ID
from ..padding import pad_ids, pad_token_id


@dataclass
class RoutingSample:
    input_ids: list[int]  # one IMAGE_PLACEHOLDER_ID per image
    category: str
    load_images: Callable[[], list]  # -> PIL images, in placeholder order
    labels: list[int] | None = None  # supervised (answer) tokens, IGNORE_INDEX elsewhere; None: unknown

    @property
    def num_images(self) -> int:
        return sum(1 for t in self.input_ids if t == IMAGE_PLACEHOLDER_ID)


def batch_inputs(model, batch: list[RoutingSample], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                                      torch.Tensor]:
    """(input ids, attention mask, preprocessed pixels or None, images per sample) of a batch, on
    `device`, for `model(ids, mask, pixel_values=..., image_counts=...)`."""
    ids, mask = pad_ids([s.input_ids for s in batch], pad_token_id(model.tokenizer, default=0), device=device)
    images = [image for s in batch for image in s.load_images()]
    pixels = torch.stack([model.vision_tower.preprocess(i) for i in images]).to(device) if images else None
    return ids, mask, pixels, torch.tensor([s.num_images for s in batch], device=device)
