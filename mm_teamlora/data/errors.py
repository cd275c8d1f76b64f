"""Problems with input data: one exception type, stable reason codes, and per-source counts.

Every record the pipeline drops is dropped for a named reason and counted; nothing disappears
silently. Under `on_error: raise` the first problem stops the run with a `DataError` naming the
file, the record (index, line where known, id) and the reason; under `on_error: skip` the record is
counted by reason in its source's `SourceReport`, with the first few examples kept for the summary
and every dropped record listed in `SourceReport.rejected` (`write_rejected` writes them as JSONL:
`rejected.jsonl` beside `data_report.json`). Kept records that were changed (truncated, `<image>`
prepended: `NOTES`) are counted and named the same way (`SourceReport.noted`, `notes.jsonl`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field

from ..files import atomic_write_text

# reason code -> what it means (the codes are stable: reports and tests refer to them)
REASONS = {
    # file and line level
    "file_missing": "the source file does not exist",
    "not_a_file": "the source path is not a regular file",
    "invalid_json": "not valid JSON (JSONL line or whole JSON file)",
    "invalid_utf8": "bytes that are not UTF-8",
    "not_an_object": "a record that is not a JSON object",
    "invalid_text": "a string that cannot be encoded (a lone UTF-16 surrogate) or that the tokenizer rejects",
    "control_characters": "a control character (NUL, BEL, ESC, ...; not tab, newline, CR) in a text, id or path",
    "unsupported_modality": "videos or audios (a field, a dataset_info.json column, or <video> / <audio> in a "
                            "turn): only images are supported",
    # LLaMA-Factory dataset_info.json entries (data.llamafactory; always an error: the entry is wrong)
    "dataset_not_found": "a dataset_info.json without the source's `dataset` key (or no `dataset` given)",
    "dataset_info_invalid": "a dataset_info.json entry without file_name, with an unknown formatting, key, column "
                            "or tag, or whose required column no record has",
    "unsupported_dataset": "a dataset_info.json entry of a kind not read here: hub or script URLs, ranking / "
                           "preference, tools, num_samples, a file type other than JSON, JSONL, parquet",
    # record structure
    "bad_id": "id that is not a non-empty string or an integer",
    "duplicate_id": "id already used by an earlier record of the same file",
    "missing_field": "a required field is missing (alpaca: instruction, output)",
    "missing_conversations": "no conversations/messages field",
    "malformed_conversations": "conversations that are not a list of turn objects",
    "empty_conversations": "an empty list of turns",
    "non_string_value": "a text, role or image path that is not a string",
    "unknown_role": "a role other than human/user, gpt/assistant, system",
    "role_order": "turns that do not alternate user/assistant (system only first)",
    "starts_with_assistant": "the first non-system turn is the assistant's",
    "ends_with_user": "the last turn is the user's (nothing to learn from it)",
    "empty_question": "a user turn with neither text nor image",
    "empty_answer": "an empty or whitespace-only assistant turn",
    "template_mismatch": "the conversation cannot be rendered by the chosen template",
    "unstorable_record": "a record whose tokenised values the data cache (pyarrow) cannot store",
    # images
    "bad_image_field": "an image field that is not a path or a list of paths",
    "no_image_root": "the record has images but its source names no image_root",
    "absolute_image_path": "an absolute image path (paths are relative to image_root)",
    "image_path_escapes_root": "an image path that leaves image_root ('..')",
    "image_count_mismatch": "number of <image> placeholders differs from number of images",
    "image_in_answer": "an <image> placeholder inside an assistant turn",
    "image_missing": "image file not found",
    "image_empty_file": "image file of zero bytes",
    "image_not_an_image": "file is not an image PIL can identify (or not a regular file)",
    "image_corrupt": "image file that fails verification or decoding",
    "image_too_large": "more pixels than images.max_pixels (decompression bomb guard)",
    "image_too_small": "a side shorter than images.min_side (e.g. 1x1)",
    "image_extreme_aspect_ratio": "long side / short side above images.max_aspect_ratio",
    # length policy
    "too_long": "longer than max_length under truncation: skip",
    "no_supervised_tokens": "no assistant token left after tail truncation",
    # MMBench TSV rows (eval.mmbench), under the same error policy
    "missing_column": "a TSV without an `index` or a `question` column (always an error)",
    "bad_index": "an index that is not a non-negative integer",
    "duplicate_index": "an index already used by an earlier row (the first is kept)",
    "missing_question": "an empty question",
    "too_few_options": "fewer than two options",
    "option_gap": "an empty option cell before a filled one (letters must run A, B, C, ...)",
    "answer_not_an_option": "an answer that is not the letter of one of the row's options",
    "missing_answer": "a row of the dev split without an answer (test-split rows may lack one)",
    "image_not_decodable": "an image cell that is not base64 of an image PIL can open",
    "image_reference_missing": "an image cell naming a row index the file does not hold (or a loop)",
}
# kept records that were changed, counted beside the skips
NOTES = {
    "image_placeholder_prepended": "images given without <image>: placeholders prepended to the first user turn",
    "truncated": "cut at the tail to max_length (never inside an image)",
    "truncated_images_dropped": "truncation removed at least one image of the record",
}
EXAMPLES_PER_REASON = 3
REJECTED_FILE = "rejected.jsonl"
NOTED_FILE = "notes.jsonl"


class ConfigError(ValueError):
    """A mixture config, template or tokenizer that cannot be used at all."""


class WriteError(OSError):
    """The prepared data could not be written (no space left, a read-only or unwritable folder): not a
    problem of the data. Names the path, the system's reason and what to change."""

    def __init__(self, path: str, error: OSError, advice: str = ""):
        self.path, self.error, self.advice = path, error, advice
        reason = error.strerror or str(error) or type(error).__name__
        super().__init__(error.errno, f"{advice + ': ' if advice else ''}cannot write {path}: {reason}")

    def __str__(self) -> str:
        return self.args[1]


class RecordProblem(Exception):
    """Raised inside record parsing; the caller adds file/index/id and applies the error policy."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class DataError(Exception):
    """One bad record (or file), with everything needed to find it."""

    def __init__(self, file: str, reason: str, detail: str = "", index: int | None = None,
                 line: int | None = None, record_id: str | None = None):
        self.file, self.reason, self.detail = file, reason, detail
        self.index, self.line, self.record_id = index, line, record_id
        where = [] if index is None else [f"record {index}"]
        if line is not None:
            where.append(f"line {line}")
        if record_id is not None:
            where.append(f"id {record_id!r}")
        super().__init__(f"{file}: {', '.join(where) or 'file'}: {reason}: {detail}".rstrip(": "))

    def to_dict(self) -> dict:
        return {"file": self.file, "index": self.index, "line": self.line, "id": self.record_id,
                "reason": self.reason, "detail": self.detail}


@dataclass
class SourceReport:
    """Counts for one source: read, kept, skipped by reason, notes on kept records, sampled."""

    name: str
    path: str
    records: int = 0  # records read (after max_samples)
    kept: int = 0  # records in the tokenised source
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> first few DataError dicts
    rejected: list = field(default_factory=list)  # every dropped record's DataError dict, in order
    note_examples: dict = field(default_factory=dict)  # note -> first few `noted` entries
    # every kept record that was changed: file, index, line, id, note, detail (+ tokens, kept_tokens
    # for a truncation)
    noted: list = field(default_factory=list)
    hints: list = field(default_factory=list)  # what the user most likely has to fix (e.g. image_root)
    sampled: int | None = None  # records drawn by the mixture (None before sampling)
    cache_hit: bool = False

    def to_dict(self, rejected: bool = False) -> dict:
        """The counts and examples; with `rejected`, also the full lists of dropped and changed
        records (the cache keeps them; the data report leaves them to `rejected.jsonl` and
        `notes.jsonl`)."""
        d = {"name": self.name, "path": self.path, "records": self.records, "kept": self.kept,
             "skipped": dict(sorted(self.skipped.items())), "notes": dict(sorted(self.notes.items())),
             "examples": self.examples, "note_examples": self.note_examples, "hints": self.hints,
             "sampled": self.sampled,
             "cache_hit": self.cache_hit}
        if rejected:
            d["rejected"], d["noted"] = self.rejected, self.noted
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SourceReport":
        return cls(name=d["name"], path=d["path"], records=d["records"], kept=d["kept"],
                   skipped=Counter(d["skipped"]), notes=Counter(d["notes"]), examples=d["examples"],
                   rejected=d.get("rejected", []), note_examples=d.get("note_examples", {}),
                   noted=d.get("noted", []), hints=d.get("hints", []), sampled=d.get("sampled"),
                   cache_hit=d.get("cache_hit", False))

    def note(self, note: str, file: str, index: int | None, line: int | None, record_id: str | None,
             detail: str = "", **extra) -> None:
        """Count a change made to a kept record (a `NOTES` code) and name the record."""
        assert note in NOTES, note
        entry = {"file": file, "index": index, "line": line, "id": record_id, "note": note, "detail": detail,
                 **extra}
        self.notes[note] += 1
        self.noted.append(entry)
        examples = self.note_examples.setdefault(note, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(entry)


def write_rejected(reports: list[SourceReport], path: str) -> str:
    """Every dropped record (or MMBench row) of `reports`, one JSON object a line: `source` (the
    source's name), `file`, `index` (0-based position in the file), `line` (JSONL and TSV only, else
    null), `id`, `reason`, `detail`, in file order per source (the pipeline finds them stage by
    stage). Written whole and atomically (an empty file when nothing was dropped); `data check`,
    `train` (the run folder), `eval`, `eval-score` and `inspect-routing` all write it this way."""
    return _write_entries(reports, path, "rejected")


def write_noted(reports: list[SourceReport], path: str) -> str:
    """Every kept record that was changed (`SourceReport.noted`: truncated, images dropped by the
    truncation, `<image>` prepended), one JSON object a line, as `write_rejected` writes the
    dropped ones but with `note` for `reason`; a truncation also gives `tokens` (before) and
    `kept_tokens` (after), images counted as their tokens."""
    return _write_entries(reports, path, "noted")


def _write_entries(reports: list[SourceReport], path: str, attribute: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    lines = [json.dumps({"source": report.name, **entry}) + "\n" for report in reports
             for entry in sorted(getattr(report, attribute), key=lambda e: -1 if e["index"] is None else e["index"])]
    atomic_write_text(path, "".join(lines))
    return path


class ErrorPolicy:
    """Applies `on_error` to one source: raise the first problem, or count it and go on."""

    def __init__(self, on_error: str, report: SourceReport):
        assert on_error in ("raise", "skip"), on_error
        self.on_error, self.report = on_error, report

    def fail(self, error: DataError) -> None:
        """A bad record: raise under `raise`, else count it."""
        if self.on_error == "raise":
            raise error
        self.drop(error)

    def drop(self, error: DataError) -> None:
        """Count a dropped record without raising (the length policy, which the user chose)."""
        self.report.skipped[error.reason] += 1
        self.report.rejected.append(error.to_dict())
        examples = self.report.examples.setdefault(error.reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(error.to_dict())
