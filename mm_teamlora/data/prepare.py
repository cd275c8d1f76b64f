"""One source file -> a tokenised `datasets.Dataset`, cached on disk.

Steps: read records (`max_samples` first ones), parse and check each conversation, resolve image
paths, check every distinct image file once (threads), render + tokenise in batches, apply the
length policy, write Arrow. Every dropped record goes through the error policy (`raise` stops at
the first, `skip` counts it by reason); the length policy is the user's choice, so its drops are
counted but never raised.

The cache entry is a folder `<cache_dir>/<source name>-<key>/` holding `data.arrow` (loaded with
`datasets.Dataset.from_file`, memory-mapped: a second run starts at once) and `report.json`,
written whole by `files.atomic_folder` (an entry is complete or absent; of two processes building
the same entry, the first to finish wins). A cache that cannot be written (a read-only folder, no
space) is logged and the source built in a temporary folder instead; when that fails too, a
`WriteError` names the folder, the system's reason and what to change. Without a cache the source is built in a temporary
folder and held in memory. The key hashes everything the result depends on: the file (absolute
path, size, modification time), format, image root, template, system prompt, tokenizer
fingerprint, max length, image token count, truncation, error policy, image check limits and
`CACHE_VERSION`. Image files are not part of the
key: after changing images in place, pass `rebuild=True`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import datasets
import pyarrow as pa

from ..constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from ..files import atomic_folder, is_complete
from .config import MixtureConfig, SourceConfig
from .errors import ConfigError, DataError, ErrorPolicy, RecordProblem, SourceReport, WriteError
from .images import check_images, resolve_image_path
from .llamafactory import DatasetEntry, is_dataset_info, optional_keys, read_dataset_info, required_keys, to_messages
from .sources import detect_format, parse_record, read_records, reported_id
from .templates import ConversationTemplate, sequence_length, tokenizer_fingerprint, truncate_tail

logger = logging.getLogger(__name__)
CACHE_VERSION = 5  # bump when a change here changes what is written
BATCH = 512
DATA_FILE, REPORT_FILE = "data.arrow", "report.json"
FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "input_ids": datasets.List(datasets.Value("int32")),
    "labels": datasets.List(datasets.Value("int32")),
    "images": datasets.List(datasets.Value("string")),  # absolute paths, in placeholder order
    "length": datasets.Value("int32"),  # tokens the model sees, images counted as image_token_count
})


@dataclass
class PreparedSource:
    """A source's tokenised records (`id`, `input_ids`, `labels`, `images`, `length`) and counts."""

    config: SourceConfig
    data: datasets.Dataset
    report: SourceReport


def cache_key(source: SourceConfig, mixture: MixtureConfig, tokenizer, entry: DatasetEntry | None = None) -> str:
    path = os.path.abspath(source.path)
    st = os.stat(path)
    extra = {}
    if entry is not None:  # a LLaMA-Factory dataset: its dataset_info.json entry decides how records read
        info = os.stat(entry.info_path)
        extra = {"dataset_info": [os.path.abspath(entry.info_path), info.st_size, info.st_mtime_ns],
                 "dataset": entry.name, "entry": entry.entry}
    parts = {**extra,
        "version": CACHE_VERSION, "file": [path, st.st_size, st.st_mtime_ns], "format": source.format,
        "image_root": source.image_root and os.path.abspath(source.image_root), "max_samples": source.max_samples,
        "template": mixture.template, "system_prompt": mixture.system_prompt,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": mixture.max_length, "image_token_count": mixture.image_token_count,
        "truncation": mixture.truncation, "on_error": mixture.on_error, "images": mixture.images.to_dict(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def prepare_source(source: SourceConfig, mixture: MixtureConfig, tokenizer,
                   template: ConversationTemplate | None = None, cache_dir: str | None = None,
                   rebuild: bool = False) -> PreparedSource:
    """Tokenise one source, or load it from the cache. Raises `DataError` under `on_error: raise`
    (and for a file that cannot be read at all, or a bad LLaMA-Factory `dataset_info.json` entry)."""
    if not os.path.isfile(source.path):
        raise DataError(source.path, "file_missing" if not os.path.exists(source.path) else "not_a_file",
                        f"source {source.name!r}")
    entry = None
    if source.dataset is not None or is_dataset_info(source.path):
        entry = read_dataset_info(source.path, source.dataset)
        if not os.path.isfile(entry.file):
            raise DataError(entry.file, "file_missing" if not os.path.exists(entry.file) else "not_a_file",
                            f"file_name of dataset {entry.name!r} in {entry.info_path} (source {source.name!r})")
        source = dataclasses.replace(source, path=entry.file, image_root=source.image_root or entry.media_dir)
    template = template or ConversationTemplate(mixture.template, tokenizer, mixture.system_prompt)
    start = time.perf_counter()
    if cache_dir is None:
        report, data = _build_uncached(source, mixture, template, entry)
    else:
        folder = os.path.join(cache_dir, f"{source.name}-{cache_key(source, mixture, tokenizer, entry)}")
        if rebuild:
            shutil.rmtree(folder, ignore_errors=True)
        if is_complete(folder):
            logger.info("source %s: cache hit %s", source.name, folder)
            return PreparedSource(source, datasets.Dataset.from_file(os.path.join(folder, DATA_FILE)),
                                  _read_report(folder))
        try:
            report = _build_cached(source, mixture, template, folder, entry)
            data = datasets.Dataset.from_file(os.path.join(folder, DATA_FILE))
        except WriteError as e:  # the cache cannot be written: build without it, and say so
            logger.warning("source %s: cannot write the data cache (%s); building it in a temporary folder "
                           "instead (set cache_dir / $MM_TEAMLORA_CACHE to a writable folder to keep it)",
                           source.name, e)
            report, data = _build_uncached(source, mixture, template, entry)
    logger.info("source %s: %d of %d records in %.1fs", source.name, report.kept, report.records,
                time.perf_counter() - start)
    return PreparedSource(source, data, report)


def _build_uncached(source: SourceConfig, mixture: MixtureConfig, template: ConversationTemplate,
                    entry: DatasetEntry | None) -> tuple[SourceReport, datasets.Dataset]:
    """Build in a temporary folder and hold the result in memory; a failure to write there is a
    `WriteError` saying what to change."""
    stage = "create"
    try:
        with tempfile.TemporaryDirectory(prefix=f"mm_teamlora-{source.name}-") as work:
            stage = "build"
            report = _build(source, mixture, template, os.path.join(work, DATA_FILE), entry)
            data = datasets.Dataset.from_file(os.path.join(work, DATA_FILE), in_memory=True)
    except WriteError as e:
        raise WriteError(e.path, e.error, f"source {source.name!r}: cannot write its tokenised data (no cache); "
                                          "free space there or point $TMPDIR at a folder with room") from e.error
    except OSError as e:
        if stage != "create":
            raise
        raise WriteError(tempfile.gettempdir(), e, f"source {source.name!r}: cannot create a temporary folder; "
                                                   "point $TMPDIR at a writable folder with room") from e
    return report, data


def _build_cached(source: SourceConfig, mixture: MixtureConfig, template: ConversationTemplate, folder: str,
                  entry: DatasetEntry | None) -> SourceReport:
    """Build into `folder` through `atomic_folder`; a failure to create, write or rename the entry
    is a `WriteError` (what reading and checking the data raises passes unchanged)."""
    stage = "create"
    try:
        with atomic_folder(folder) as work:
            stage = "build"
            report = _build(source, mixture, template, os.path.join(work, DATA_FILE), entry)
            stage = "finish"
            with open(os.path.join(work, REPORT_FILE), "w", encoding="utf-8") as f:
                json.dump(report.to_dict(rejected=True), f, indent=1)
    except OSError as e:
        if isinstance(e, WriteError) or stage == "build":
            raise
        raise WriteError(folder, e) from e
    return report


def _read_report(folder: str) -> SourceReport:
    with open(os.path.join(folder, REPORT_FILE), encoding="utf-8") as f:
        report = SourceReport.from_dict(json.load(f))
    report.cache_hit = True
    return report


def _build(source: SourceConfig, mixture: MixtureConfig, template: ConversationTemplate, out_path: str,
           entry: DatasetEntry | None = None) -> SourceReport:
    report = SourceReport(name=source.name, path=source.path)
    policy = ErrorPolicy(mixture.on_error, report)

    def fail(raw, problem: RecordProblem, rid: str | None = None) -> None:
        policy.fail(DataError(source.path, problem.reason, problem.detail, raw.index, raw.line, rid))

    # 1. parse and check records
    fmt = "messages" if entry is not None else None if source.format == "auto" else source.format
    parsed, seen = [], {}
    records = read_records(source.path, source.max_samples)
    if entry is not None:  # a column mapping no record matches is the entry's mistake: check it first
        records = list(records)
        _check_columns(entry, [r.value for r in records if isinstance(r.value, dict)])
    for raw in records:
        report.records += 1
        if raw.problem is not None:
            fail(raw, raw.problem)
            continue
        rid = reported_id(raw.value)
        if fmt is None and isinstance(raw.value, dict):
            fmt = detect_format(raw.value)
        try:
            value = raw.value if entry is None else to_messages(raw.value, entry)
            conv = parse_record(value, fmt or "llava", raw.index)
            if rid is not None and rid in seen:
                raise RecordProblem("duplicate_id", f"first used by record {seen[rid]}")
            paths = [resolve_image_path(source.image_root, p) for p in conv.images]
        except RecordProblem as problem:
            fail(raw, problem, rid)
            continue
        if rid is not None:
            seen[rid] = raw.index
        parsed.append((raw, conv, paths))


    # 2. check every distinct image file once
    distinct = sorted({p for _, _, paths in parsed for p in paths})
    bad = check_images(distinct, mixture.images)
    hint = _image_root_hint(source, parsed, distinct, bad)
    if hint is not None:
        logger.warning("source %s: %s", source.name, hint)
        report.hints.append(hint)
    usable = []
    for raw, conv, paths in parsed:
        problem = next((bad[p] for p in paths if p in bad), None)
        if problem is not None:
            if hint is not None and mixture.on_error == "raise":  # the error says it: it is all there is
                problem = RecordProblem(problem.reason, f"{problem.detail}; {hint}")
            fail(raw, problem, conv.id)
        else:
            usable.append((raw, conv, paths))

    # 3. tokenise, apply the length policy, write
    schema = FEATURES.arrow_schema
    try:
        with pa.OSFile(out_path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for b in range(0, len(usable), BATCH):
                batch = usable[b:b + BATCH]
                rows, owners = {name: [] for name in FEATURES}, []
                for (raw, conv, paths), result in zip(batch, template.encode([c.messages for _, c, _ in batch])):
                    if isinstance(result, RecordProblem):
                        fail(raw, result, conv.id)
                        continue
                    ids, labels = result
                    row = _apply_length_policy(ids, labels, paths, mixture, policy, source.path, raw, conv)
                    if row is None:
                        continue
                    for note, info in conv.notes.items():
                        report.note(note, source.path, raw.index, raw.line, conv.id, **info)
                    for name, value in zip(("id", "input_ids", "labels", "images", "length"), (conv.id,) + row):
                        rows[name].append(value)
                    owners.append((raw, conv))
                report.kept += _write_rows(writer, schema, rows, owners, fail)
    except OSError as e:  # no space, a read-only folder, a quota: the write failed, not the data
        raise WriteError(out_path, e) from e
    return report


def _write_rows(writer, schema, rows: dict[str, list], owners: list, fail) -> int:
    """Write a batch of rows in one record batch; when pyarrow refuses it, write them one at a time
    so that only the rows it cannot store fail (`unstorable_record`). Returns the rows written."""
    if not owners:
        return 0
    try:
        writer.write_batch(pa.RecordBatch.from_pydict(rows, schema=schema))
        return len(owners)
    except (pa.ArrowException, ValueError, TypeError, UnicodeError):
        pass
    written = 0
    for i, (raw, conv) in enumerate(owners):
        try:
            one = pa.RecordBatch.from_pydict({name: [values[i]] for name, values in rows.items()}, schema=schema)
        except (pa.ArrowException, ValueError, TypeError, UnicodeError) as e:
            fail(raw, RecordProblem("unstorable_record", f"{type(e).__name__}: {e}"), conv.id)
            continue
        writer.write_batch(one)
        written += 1
    return written


def _image_root_hint(source: SourceConfig, parsed: list, distinct: list[str], bad: dict) -> str | None:
    """When every image of a source is missing, the likely cause is `image_root`: say which paths
    were tried and, when the first images exist under a nearby folder, which root would work."""
    if not distinct or any(bad.get(p) is None or bad[p].reason != "image_missing" for p in distinct):
        return None
    root = os.path.abspath(source.image_root) if source.image_root else None
    tried = distinct[:3]
    relative = list(dict.fromkeys(p for _, conv, _ in parsed for p in conv.images))[:3]
    text = (f"all {len(distinct)} images of source {source.name!r} are missing under image_root={root!r} "
            f"(tried {', '.join(map(repr, tried))}{', ...' if len(distinct) > len(tried) else ''})")
    found = _find_root(relative, [root] if root else [], os.path.dirname(os.path.abspath(source.path)))
    if found is not None:
        return f"{text}; {relative[0]!r} exists under {found!r}: is image_root: {found} meant?"
    return f"{text}; is image_root right? Paths in the records resolve against it"


def _find_root(relative: list[str], roots: list[str], data_dir: str, limit: int = 64) -> str | None:
    """A folder near `roots` and the data file's folder under which every path of `relative` exists."""
    near = [data_dir, os.path.dirname(data_dir)] + [r for root in roots for r in (os.path.dirname(root), root)]
    candidates = list(dict.fromkeys(near))
    for folder in list(dict.fromkeys(near)):
        try:
            with os.scandir(folder) as entries:
                candidates += sorted(e.path for e in entries if e.is_dir() and not e.name.startswith("."))[:limit]
        except OSError:
            continue
    for folder in dict.fromkeys(candidates):
        if folder not in roots and all(os.path.isfile(os.path.join(folder, p)) for p in relative):
            return folder
    return None


def _check_columns(entry: DatasetEntry, objects: list[dict]) -> None:
    """A required column that no record has is the entry's mistake, not every record's: a
    `DataError` naming the dataset_info.json; an optional one is logged."""
    if not objects:
        return
    keys = set().union(*objects)
    for key in required_keys(entry):
        if key not in keys:
            column = next(c for c, k in entry.columns.items() if k == key)
            raise DataError(entry.info_path, "dataset_info_invalid",
                            f"dataset {entry.name!r}: columns.{column} is {key!r}, a key no record of {entry.file} "
                            f"has (their keys: {', '.join(sorted(map(str, keys)))})")
    for column, key in optional_keys(entry).items():
        if key not in keys:
            logger.warning("dataset %r in %s: columns.%s names %r, a key no record of %s has", entry.name,
                           entry.info_path, column, key, entry.file)


def _apply_length_policy(ids, labels, paths, mixture: MixtureConfig, policy: ErrorPolicy, file, raw, conv):
    """(input_ids, labels, images, length) that fit `max_length`, or None when dropped (counted)."""
    if paths and mixture.image_token_count is None:
        raise ConfigError(f"mixture {mixture.name!r}: {file} has images (first: record {raw.index}) but "
                          "image_token_count is unknown; pass the model's (build_dataset(config, "
                          "**model.data_inputs())) or set it in the mixture")
    length = sequence_length(ids, mixture.image_token_count)
    if length <= mixture.max_length:
        return ids, labels, paths, length
    if mixture.truncation == "skip":
        policy.drop(DataError(file, "too_long", f"{length} tokens > max_length {mixture.max_length}",
                              raw.index, raw.line, conv.id))
        return None
    ids, labels = truncate_tail(ids, labels, mixture.max_length, mixture.image_token_count)
    if all(label == IGNORE_INDEX for label in labels):
        policy.drop(DataError(file, "no_supervised_tokens", f"{length} tokens cut to "
                              f"{sequence_length(ids, mixture.image_token_count)} (max_length "
                              f"{mixture.max_length}) leave no assistant token", raw.index, raw.line, conv.id))
        return None
    kept_images = sum(1 for t in ids if t == IMAGE_PLACEHOLDER_ID)
    kept = sequence_length(ids, mixture.image_token_count)
    conv.notes["truncated"] = {"detail": f"{length} tokens cut to {kept} (max_length {mixture.max_length})",
                               "tokens": length, "kept_tokens": kept}
    if kept_images < len(paths):
        conv.notes["truncated_images_dropped"] = {
            "detail": f"{kept_images} of {len(paths)} images kept ({length} tokens cut to {kept})",
            "tokens": length, "kept_tokens": kept}
    return ids, labels, paths[:kept_images], kept
