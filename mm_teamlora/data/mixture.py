"""A mixture: prepared sources, how many records each contributes, and one seeded order.

`build_mixture` prepares every source (cached), draws each source's share (see `config.py` for
weights and repeats), logs the per-source counts before and after sampling with the skip reasons
(`format_report`; logger `mm_teamlora.data.mixture`, level INFO), and writes them to
`<report_dir>/data_report.json` when a run folder is given, with every dropped record (file,
position, line, id, reason, detail) in `<report_dir>/rejected.jsonl` beside it, and every kept
record that was changed (truncated, with its token counts; `<image>` prepended) in
`<report_dir>/notes.jsonl`. The order is a pure function of the config (seed included), so two runs
see the same records in the same order.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass

import numpy as np

from ..files import cache_root
from .config import MixtureConfig
from .errors import NOTED_FILE, NOTES, REJECTED_FILE, ConfigError, SourceReport, write_noted, write_rejected
from .prepare import PreparedSource, prepare_source
from .templates import ConversationTemplate

logger = logging.getLogger(__name__)


@dataclass
class Mixture:
    """Prepared sources and the drawn order: `order[i] = (source index, row in that source)`."""

    config: MixtureConfig
    sources: list[PreparedSource]
    order: np.ndarray  # (N, 2) int64

    def __len__(self) -> int:
        return len(self.order)

    @property
    def reports(self) -> list[SourceReport]:
        return [s.report for s in self.sources]

    def report_dict(self) -> dict:
        return {"mixture": self.config.name, "total": len(self), "sources": [r.to_dict() for r in self.reports]}


def sample_counts(config: MixtureConfig, kept: list[int]) -> list[int]:
    """How many records each source contributes (repeat: of its own size; weight: of the total)."""
    if not config.weighted:
        return [round((s.repeat if s.repeat is not None else 1.0) * n) for s, n in zip(config.sources, kept)]
    weights = np.array([s.weight for s in config.sources], dtype=np.float64)
    shares = weights / weights.sum()
    if config.num_samples is not None:
        total = config.num_samples
    else:
        empty = [s.name for s, n in zip(config.sources, kept) if n == 0]
        if empty:
            raise ConfigError(f"mixture {config.name!r}: weighted source(s) {empty} have no usable record; "
                              "set num_samples or remove them")
        total = math.floor(min(n / p for n, p in zip(kept, shares)) + 1e-9)
    counts = [round(total * p) for p in shares]
    for s, n, c in zip(config.sources, kept, counts):
        if c > 0 and n == 0:
            raise ConfigError(f"mixture {config.name!r}: source {s.name!r} has no usable record to draw {c} from")
    return counts


def draw(available: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` row indices out of `available`: whole passes first, then a random subset without
    replacement, so no record repeats more often than needed."""
    if count == 0 or available == 0:
        return np.zeros(0, dtype=np.int64)
    full, rest = divmod(count, available)
    parts = [np.arange(available, dtype=np.int64)] * full
    parts.append(np.sort(rng.choice(available, size=rest, replace=False)).astype(np.int64))
    return np.concatenate(parts)


def build_mixture(config: MixtureConfig, tokenizer, cache_dir: str | None = None, use_cache: bool = True,
                  rebuild: bool = False, report_dir: str | None = None) -> Mixture:
    """Prepare, sample and order a mixture. `cache_dir` defaults to the config's, then to
    `files.cache_root("data")` (under $MM_TEAMLORA_CACHE) (`use_cache=False`: no cache);
    `rebuild` ignores existing entries. The counts are logged, kept in `Mixture.reports` and
    written to `report_dir` when given. Raises `DataError` under `on_error: raise`, `ConfigError`
    for unusable configs."""
    config.validate()
    if use_cache:
        cache_dir = cache_dir or config.cache_dir or cache_root("data")
    else:
        cache_dir = None
    template = ConversationTemplate(config.template, tokenizer, config.system_prompt)
    sources = [prepare_source(s, config, tokenizer, template, cache_dir, rebuild) for s in config.sources]
    counts = sample_counts(config, [s.report.kept for s in sources])
    parts = []
    for i, (source, count) in enumerate(zip(sources, counts)):
        rows = draw(source.report.kept, count, np.random.default_rng([config.seed, i]))
        source.report.sampled = len(rows)
        parts.append(np.stack([np.full_like(rows, i), rows], axis=1))
    order = np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)
    if config.shuffle:
        order = order[np.random.default_rng([config.seed, len(sources)]).permutation(len(order))]
    mixture = Mixture(config, sources, order)
    logger.info("%s", format_report(mixture.reports, title=f"mixture {config.name!r}"))
    if report_dir is not None:
        write_report(mixture.report_dict(), report_dir)
        write_rejected(mixture.reports, os.path.join(report_dir, REJECTED_FILE))
        write_noted(mixture.reports, os.path.join(report_dir, NOTED_FILE))
    return mixture


def write_report(report: dict, report_dir: str, name: str = "data_report.json") -> str:
    os.makedirs(report_dir, exist_ok=True)
    path = os.path.join(report_dir, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return path


def format_report(reports: list[SourceReport], title: str = "data") -> str:
    """The count table: per source, records read, skipped, kept (before sampling) and drawn (after),
    then every skip reason and note with its count."""
    width = max([len(r.name) for r in reports] + [6])
    lines = [f"{title}: per-source counts",
             f"  {'source':<{width}} {'read':>9} {'skipped':>9} {'kept':>9} {'sampled':>9}  cache"]
    for r in reports:
        sampled = "-" if r.sampled is None else str(r.sampled)
        lines.append(f"  {r.name:<{width}} {r.records:>9} {sum(r.skipped.values()):>9} {r.kept:>9} {sampled:>9}"
                     f"  {'hit' if r.cache_hit else 'built'}")
    total_sampled = sum(r.sampled or 0 for r in reports)
    lines.append(f"  {'total':<{width}} {sum(r.records for r in reports):>9} "
                 f"{sum(sum(r.skipped.values()) for r in reports):>9} {sum(r.kept for r in reports):>9} "
                 f"{total_sampled:>9}")
    for r in reports:
        for reason, count in sorted(r.skipped.items()):
            example = r.examples.get(reason, [{}])[0]
            where = "" if example.get("index") is None else f" (first: record {example['index']}" + (
                "" if example.get("id") is None else f", id {example['id']!r}") + ")"
            lines.append(f"  skipped  {r.name}: {reason}: {count}{where}")
        for hint in r.hints:
            lines.append(f"  hint     {r.name}: {hint}")
        for note, count in sorted(r.notes.items()):
            example = r.note_examples.get(note, [{}])[0]
            where = "" if example.get("index") is None else f"; first: record {example['index']}" + (
                "" if example.get("id") is None else f", id {example['id']!r}") + f", {example.get('detail')}"
            lines.append(f"  note     {r.name}: {note}: {count} ({NOTES[note]}{where})")
    return "\n".join(lines)
