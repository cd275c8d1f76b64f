"""One question or conversation as the model sees it: what the routing report records and the
expert-masking test scores (`routing`, `ablation`; its own module so neither imports the other)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..constants import IMAGE_PLACEHOLDER_ID


@dataclass
class RoutingSample:
    input_ids: list[int]  # one IMAGE_PLACEHOLDER_ID per image
    category: str
    load_images: Callable[[], list]  # -> PIL images, in placeholder order
    labels: list[int] | None = None  # supervised (answer) tokens, IGNORE_INDEX elsewhere; None: unknown

    @property
    def num_images(self) -> int:
        return sum(1 for t in self.input_ids if t == IMAGE_PLACEHOLDER_ID)
