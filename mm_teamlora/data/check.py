"""What `mm-teamlora data check` runs: the whole data pipeline of a mixture, no training.

Reads, checks, tokenises (or loads from the cache) and samples every source, then loads and
processes the images of a first batch and collates it. The tokenizer, image processor and tokens
per image are handed in (a model's `data_inputs()`, or a tokenizer alone for a mixture without
images); the caller decides what to show and which exit code a failure gives.
"""

from __future__ import annotations

from dataclasses import dataclass

from .collate import DataCollator
from .config import MixtureConfig
from .dataset import InstructionDataset, with_image_token_count
from .images import ResizeToTensor
from .mixture import Mixture, build_mixture

CHECK_BATCH = 4


@dataclass
class CheckResult:
    mixture: Mixture
    dataset: InstructionDataset
    batch: dict | None  # the collated first batch; None when the mixture is empty

    @property
    def summary(self) -> str:
        if self.batch is None:
            return "the mixture is empty"
        images = 0 if self.batch["pixel_values"] is None else len(self.batch["pixel_values"])
        return (f"first batch: input_ids {tuple(self.batch['input_ids'].shape)}, {images} images; "
                f"{len(self.dataset)} samples in the mixture")


def check_mixture(config: MixtureConfig, tokenizer, image_processor=None, image_token_count: int | None = None,
                  rebuild: bool = False, cache_dir: str | None = None, report_dir: str | None = None) -> CheckResult:
    """Build the mixture (counts in `report_dir/data_report.json` when given) and collate a first
    batch of up to `CHECK_BATCH` samples, images processed by `image_processor` (default
    `ResizeToTensor()`). `image_token_count`: the model's tokens per image (a mixture that names
    another is a `ConfigError`). `rebuild`: ignore the cache. Raises `DataError` under
    `on_error: raise`, `ConfigError` for an unusable config."""
    config = with_image_token_count(config, image_token_count)
    mixture = build_mixture(config, tokenizer, cache_dir=cache_dir, rebuild=rebuild, report_dir=report_dir)
    dataset = InstructionDataset(mixture, image_processor or ResizeToTensor())
    batch = None
    if len(dataset):
        batch = DataCollator.from_tokenizer(tokenizer)([dataset[i] for i in range(min(CHECK_BATCH, len(dataset)))])
    return CheckResult(mixture, dataset, batch)
