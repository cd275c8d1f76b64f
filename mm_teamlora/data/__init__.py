"""Instruction data: LLaVA / text-only / messages sources, templates with exact assistant labels,
weighted mixtures from `data_configs/*.yaml`, image checks, a torch Dataset and a collator.

    config = MixtureConfig.from_yaml("data_configs/fixtures.yaml")
    dataset = build_dataset(config, **model.data_inputs())   # tokenizer, image processor, tokens per image
    loader = DataLoader(dataset, batch_size=8, collate_fn=DataCollator.from_tokenizer(tokenizer))
    # or grouped by modality and length, split over ranks, resumable:
    loader = DataLoader(dataset, batch_sampler=GroupedBatchSampler.from_dataset(dataset, batch_size=8),
                        collate_fn=DataCollator.from_tokenizer(tokenizer))

`build_demo_data` (`mm-teamlora data demo`) writes a small real training mix and a disjoint
MMBench-style evaluation set from installed assets (see `demo/`).

Nothing is dropped silently: every skipped record is counted by reason (`errors.REASONS`), and
under `on_error: raise` the first problem stops with file, record index, line, id and reason.
"""

from .check import CheckResult, check_mixture
from .collate import DataCollator
from .config import MixtureConfig, SourceConfig
from .dataset import InstructionDataset, build_dataset
from .demo import build_demo_data
from .errors import NOTES, REASONS, ConfigError, DataError, SourceReport, WriteError
from .images import ImageCheckConfig, ResizeToTensor, check_image, load_image, to_rgb
from .mixture import Mixture, build_mixture, format_report
from .prepare import PreparedSource, prepare_source
from .sampler import GroupedBatchSampler
from .sources import Conversation, parse_record, read_records, reported_id
from .templates import TEMPLATES, ConversationTemplate, Piece, truncate_tail

__all__ = [
    "CheckResult", "check_mixture", "DataCollator", "MixtureConfig", "SourceConfig", "InstructionDataset",
    "build_dataset", "NOTES", "REASONS", "ConfigError", "DataError", "SourceReport", "WriteError", "ImageCheckConfig",
    "ResizeToTensor", "check_image", "load_image", "to_rgb", "Mixture", "build_mixture", "format_report",
    "PreparedSource", "prepare_source", "Conversation", "parse_record", "read_records", "reported_id", "TEMPLATES",
    "ConversationTemplate", "Piece", "truncate_tail", "GroupedBatchSampler", "build_demo_data",
]
