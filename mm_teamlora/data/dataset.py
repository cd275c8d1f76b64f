"""The torch `Dataset` over a mixture: token ids from the Arrow cache, images loaded on access.

Images are not cached with the tokens: each `__getitem__` opens the sample's image files, converts
them to RGB (`images.load_image`) and runs the image processor (any callable `PIL.Image (RGB) ->
torch.Tensor (C, H, W)`). The files were checked when the source was prepared; one that changed
since raises a `DataError` naming it rather than training on a hole.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.compute as pc
import torch

from .config import MixtureConfig
from .errors import ConfigError, DataError, RecordProblem
from .images import ImageCheckConfig, load_image
from .mixture import Mixture, build_mixture


class InstructionDataset(torch.utils.data.Dataset):
    """Samples of a `Mixture`, in its seeded order.

    An item: `input_ids`, `labels` (LongTensor, one `IMAGE_PLACEHOLDER_ID` per image), `pixel_values`
    (FloatTensor (n_images, C, H, W), or None for a text-only sample), `image_count`, `id`, `source`.
    """

    def __init__(self, mixture: Mixture, image_processor=None, image_check: ImageCheckConfig | None = None):
        self.mixture = mixture
        self.image_processor = image_processor
        self.image_check = image_check or mixture.config.images
        # per item, in mixture order: the length the model sees (images counted as their tokens)
        # and the number of images (0 = text-only), e.g. for a sampler that groups batches
        tables = [s.data.data for s in mixture.sources]  # the Arrow tables behind the datasets
        sizes = [t.num_rows for t in tables]
        rows = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)[mixture.order[:, 0]] + mixture.order[:, 1]
        lengths = [t.column("length").to_numpy().astype(np.int64) for t in tables]
        counts = [pc.list_value_length(t.column("images")).to_numpy().astype(np.int64) for t in tables]
        self.lengths = np.concatenate(lengths)[rows] if sizes else np.zeros(0, dtype=np.int64)
        self.image_counts = np.concatenate(counts)[rows] if sizes else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.mixture)

    def __getitem__(self, index: int) -> dict:
        source_index, row = (int(x) for x in self.mixture.order[index])
        source = self.mixture.sources[source_index]
        record = source.data[row]
        pixel_values = None
        if record["images"]:
            if self.image_processor is None:
                raise ValueError(f"sample {record['id']!r} of {source.config.name!r} has images and the "
                                 "dataset was given no image_processor")
            tensors = []
            for path in record["images"]:
                try:
                    image = load_image(path, self.image_check)
                except (RecordProblem, OSError) as e:
                    reason = e.reason if isinstance(e, RecordProblem) else "image_corrupt"
                    raise DataError(source.config.path, reason, f"{path} changed after it was checked: {e}",
                                    record_id=record["id"]) from None
                tensors.append(self.image_processor(image))
            pixel_values = torch.stack(tensors)
        return {
            "input_ids": torch.tensor(record["input_ids"], dtype=torch.long),
            "labels": torch.tensor(record["labels"], dtype=torch.long),
            "pixel_values": pixel_values,
            "image_count": len(record["images"]),
            "id": record["id"],
            "source": source.config.name,
        }


def build_dataset(config: MixtureConfig | str, tokenizer, image_processor=None, image_token_count: int | None = None,
                  **mixture_kwargs) -> InstructionDataset:
    """Config (object or YAML path) -> `InstructionDataset`; other keyword arguments go to
    `build_mixture`. With a model: `build_dataset(config, **model.data_inputs())`.

    `image_token_count` is the model's tokens per image, the truth: a config that names another
    value is a `ConfigError`; the caller's config object is not changed."""
    if isinstance(config, str):
        config = MixtureConfig.from_yaml(config)
    config = with_image_token_count(config, image_token_count)
    return InstructionDataset(build_mixture(config, tokenizer, **mixture_kwargs), image_processor)


def with_image_token_count(config: MixtureConfig, image_token_count: int | None) -> MixtureConfig:
    """A copy of `config` with the model's tokens per image (None: keep the config's)."""
    if image_token_count is None:
        return config
    if config.image_token_count not in (None, image_token_count):
        raise ConfigError(f"mixture {config.name!r} says image_token_count: {config.image_token_count} but the "
                          f"model gives {image_token_count} tokens per image; remove the key (the model's "
                          "value is used) or make it agree")
    return dataclasses.replace(config, image_token_count=image_token_count)
