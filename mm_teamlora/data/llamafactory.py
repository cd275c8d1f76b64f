"""LLaMA-Factory datasets, read as that toolkit describes them in its `dataset_info.json`.

A source names the `dataset_info.json` file as its `path` and one of its keys as `dataset`:

    sources:
      - {path: LLaMA-Factory/data/dataset_info.json, dataset: mllm_demo}

The entry's `file_name` (relative to the `dataset_info.json` folder; `.json`, `.jsonl` or
`.parquet`) is the data file; images resolve against the source's `image_root`, by default that same
folder (LLaMA-Factory's `media_dir` default). Honoured: `formatting` (`alpaca`, the default, or
`sharegpt`), `columns` (`prompt`, `query`, `response`, `history`, `system` for alpaca; `messages`,
`system` for sharegpt; `images` for both) with LLaMA-Factory's defaults, and `tags` (`role_tag`,
`content_tag`, `user_tag`, `assistant_tag`, `system_tag`; sharegpt only). `file_sha1` and `split`
are ignored as LLaMA-Factory ignores them for a local file.

Refused, with the `dataset_info.json` path, the dataset and the problem in a `DataError` that stops
the run whatever `on_error` says (the entry, not a record, is wrong):
- `dataset_not_found`: no such key (the error lists the file's keys), or no `dataset:` given;
- `dataset_info_invalid`: not a JSON object, no `file_name`, an unknown `formatting`, unknown keys,
  columns or tags (a typo is never ignored), a column or tag of the other formatting (e.g.
  `columns.messages` without `formatting: sharegpt`), or a required column (`prompt` and `response`,
  or `messages`) that no record of the data file has;
- `unsupported_dataset`: `hf_hub_url`, `ms_hub_url`, `om_hub_url`, `script_url`, `cloud_file_name`
  (nothing is downloaded), `ranking` / preference columns (`chosen`, `rejected`, `kto_tag`), `tools`
  and tool-call tags, `num_samples` (use the source's `max_samples` / `repeat`), a file type other
  than JSON, JSONL or parquet;
- `unsupported_modality`: `videos` / `audios` columns.

Each record is turned into this package's `messages` form and checked as any other (a record
without its mapped column is `missing_field` / `missing_conversations`, naming the column).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from .errors import DataError, RecordProblem

INFO_FILE = "dataset_info.json"
FORMATTINGS = ("alpaca", "sharegpt")
HONOURED = {"file_name", "formatting", "columns", "tags"}
IGNORED = {"file_sha1", "split"}
REMOTE = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
UNSUPPORTED_KEYS = {"subset": "a hub dataset's subset", "folder": "a hub dataset's folder",
                    "num_samples": "sampling in the entry (use the source's max_samples or repeat)",
                    "ranking": "preference (ranking) data"}
COLUMN_DEFAULTS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "history": None, "system": None,
               "images": None},
    "sharegpt": {"messages": "conversations", "system": None, "images": None},
}
UNSUPPORTED_COLUMNS = {"videos": "unsupported_modality", "audios": "unsupported_modality",
                       "chosen": "unsupported_dataset", "rejected": "unsupported_dataset",
                       "kto_tag": "unsupported_dataset", "tools": "unsupported_dataset"}
TAG_DEFAULTS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "system_tag": "system"}
TOOL_TAGS = ("observation_tag", "function_tag")
REQUIRED = {"alpaca": ("prompt", "response"), "sharegpt": ("messages",)}
FILE_TYPES = (".json", ".jsonl", ".parquet")


@dataclass
class DatasetEntry:
    """One checked entry of a `dataset_info.json`: where its data is and how to read a record."""

    info_path: str
    name: str
    file: str  # the data file, absolute
    formatting: str
    columns: dict[str, str | None]  # every column of the formatting, LLaMA-Factory's defaults filled in
    tags: dict[str, str] = field(default_factory=dict)  # sharegpt only
    entry: dict = field(default_factory=dict)  # as written (for the cache key)

    @property
    def media_dir(self) -> str:
        """The folder images resolve against by default: the `dataset_info.json` folder."""
        return os.path.dirname(os.path.abspath(self.info_path))

    def where(self, column: str) -> str:
        return f"columns.{column} of dataset {self.name!r} in {self.info_path}"


def is_dataset_info(path: str) -> bool:
    return os.path.basename(path) == INFO_FILE


def read_dataset_info(path: str, name: str | None) -> DatasetEntry:
    """The entry `name` of the `dataset_info.json` at `path`, checked; raises `DataError` (see the
    module doc) naming the file, the dataset and the problem."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            info = json.load(f)
    except UnicodeDecodeError as e:
        raise DataError(path, "invalid_utf8", f"byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise DataError(path, "invalid_json", f"{e.msg} at column {e.colno}", line=e.lineno) from None
    if not isinstance(info, dict):
        raise DataError(path, "dataset_info_invalid", f"a JSON object of datasets expected, got {type(info).__name__}")
    if name is None:
        raise DataError(path, "dataset_not_found", "a LLaMA-Factory dataset_info.json: name one of its datasets "
                                                   f"with `dataset:` ({_names(info)})")
    if name not in info:
        raise DataError(path, "dataset_not_found", f"no dataset {name!r}; it holds {_names(info)}")

    def fail(reason: str, detail: str) -> DataError:
        return DataError(path, reason, f"dataset {name!r}: {detail}")

    entry = info[name]
    if not isinstance(entry, dict):
        raise fail("dataset_info_invalid", f"a JSON object expected, got {type(entry).__name__}")
    for key in REMOTE:
        if entry.get(key):
            raise fail("unsupported_dataset", f"{key} {entry[key]!r}: only local files are read (give file_name)")
    for key, what in UNSUPPORTED_KEYS.items():
        if entry.get(key) not in (None, False):
            raise fail("unsupported_dataset", f"{key} {entry[key]!r}: {what} is not supported")
    unknown = sorted(set(entry) - HONOURED - IGNORED - set(REMOTE) - set(UNSUPPORTED_KEYS))
    if unknown:
        raise fail("dataset_info_invalid", f"unknown key(s) {', '.join(map(repr, unknown))}; "
                                           f"known: {', '.join(sorted(HONOURED | IGNORED))}")
    file_name = entry.get("file_name")
    if not isinstance(file_name, str) or not file_name.strip():
        raise fail("dataset_info_invalid", "no file_name (the data file, relative to the dataset_info.json folder)"
                   if file_name is None else f"file_name {file_name!r} is not a file name")
    if not file_name.endswith(FILE_TYPES):
        raise fail("unsupported_dataset", f"file_name {file_name!r}: only {', '.join(FILE_TYPES)} files are read")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise fail("dataset_info_invalid", f"unknown formatting {formatting!r}; LLaMA-Factory's are "
                                           f"{', '.join(FORMATTINGS)}")
    columns = _mapping(entry, "columns", fail)
    other = next(f for f in FORMATTINGS if f != formatting)
    for column, value in columns.items():
        if column in UNSUPPORTED_COLUMNS:
            raise fail(UNSUPPORTED_COLUMNS[column], f"columns.{column} {value!r}: "
                       + ("only images are supported" if UNSUPPORTED_COLUMNS[column] == "unsupported_modality"
                          else "not supported (supervised conversations only)"))
        if column not in COLUMN_DEFAULTS[formatting]:
            hint = (f" (a {other} column: is formatting: {other} missing?)" if column in COLUMN_DEFAULTS[other]
                    else f"; {formatting} columns: {', '.join(COLUMN_DEFAULTS[formatting])}")
            raise fail("dataset_info_invalid", f"columns.{column} is not a column of formatting {formatting!r}{hint}")
        if not isinstance(value, str) or not value:
            raise fail("dataset_info_invalid", f"columns.{column} must name a record key, got {value!r}")
    tags = _mapping(entry, "tags", fail)
    if tags and formatting != "sharegpt":
        raise fail("dataset_info_invalid", f"tags are for formatting 'sharegpt', not {formatting!r} "
                                           "(is formatting: sharegpt missing?)")
    for tag, value in tags.items():
        if tag in TOOL_TAGS:
            raise fail("unsupported_dataset", f"tags.{tag} {value!r}: tool calls are not supported")
        if tag not in TAG_DEFAULTS:
            raise fail("dataset_info_invalid", f"unknown tag {tag!r}; tags: {', '.join(TAG_DEFAULTS)}")
        if not isinstance(value, str) or not value:
            raise fail("dataset_info_invalid", f"tags.{tag} must be a string, got {value!r}")
    file = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), file_name))
    return DatasetEntry(path, name, file, formatting, {**COLUMN_DEFAULTS[formatting], **columns},
                        {**TAG_DEFAULTS, **tags} if formatting == "sharegpt" else {}, entry)


def _names(info: dict) -> str:
    names = sorted(info)
    return ", ".join(map(repr, names[:20])) + (f" and {len(names) - 20} more" if len(names) > 20 else "") or "nothing"


def _mapping(entry: dict, key: str, fail) -> dict:
    value = entry.get(key) or {}
    if not isinstance(value, dict):
        raise fail("dataset_info_invalid", f"{key} must be a JSON object, got {type(value).__name__}")
    return value


def to_messages(record: object, entry: DatasetEntry) -> object:
    """A record of the entry's data file in this package's `messages` form (`id`, `messages`,
    `images`; `videos` / `audios` fields carried over, so they are refused, never dropped). Not an
    object: returned as it is (the record check names it). Raises `RecordProblem`."""
    if not isinstance(record, dict):
        return record
    c = entry.columns
    messages = _sharegpt(record, entry) if entry.formatting == "sharegpt" else _alpaca(record, entry)
    system = record.get(c["system"]) if c["system"] else None
    if system is not None:
        if not isinstance(system, str):
            raise RecordProblem("non_string_value", f"{c['system']!r} (the system column) is {system!r:.60}")
        if system.strip() and not (messages and messages[0]["role"] == "system"):
            messages = [{"role": "system", "content": system}] + messages
    out = {key: record[key] for key in ("id", "videos", "video", "audios", "audio") if key in record}
    out["messages"] = messages
    if c["images"] and record.get(c["images"]) is not None:
        out["images"] = record[c["images"]]
    return out


def _sharegpt(record: dict, entry: DatasetEntry) -> list[dict]:
    key, tags = entry.columns["messages"], entry.tags
    turns = record.get(key)
    if turns is None:
        raise RecordProblem("missing_conversations", f"no {key!r} field ({entry.where('messages')})")
    if not isinstance(turns, list):
        raise RecordProblem("malformed_conversations", f"{key!r} is a {type(turns).__name__}, not a list")
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
    messages = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or tags["role_tag"] not in turn or tags["content_tag"] not in turn:
            raise RecordProblem("malformed_conversations", f"turn {t} is not an object with {tags['role_tag']!r} and "
                                                           f"{tags['content_tag']!r} (tags of dataset {entry.name!r})")
        role = turn[tags["role_tag"]]
        if not isinstance(role, str):
            raise RecordProblem("non_string_value", f"turn {t}: role {role!r}")
        if role not in roles:
            raise RecordProblem("unknown_role", f"turn {t}: role {role!r}; the tags of dataset {entry.name!r} "
                                                f"name {', '.join(map(repr, roles))}")
        messages.append({"role": roles[role], "content": turn[tags["content_tag"]]})
    return messages


def _alpaca(record: dict, entry: DatasetEntry) -> list[dict]:
    c = entry.columns
    for column in ("prompt", "response"):
        if record.get(c[column]) is None:
            raise RecordProblem("missing_field", f"no {c[column]!r} ({entry.where(column)})")
    for column in ("prompt", "query", "response"):
        value = record.get(c[column]) if c[column] else None
        if value is not None and not isinstance(value, str):
            raise RecordProblem("non_string_value", f"{c[column]!r} is {value!r:.60}")
    query = record.get(c["query"]) if c["query"] else None
    question = record[c["prompt"]] + ("\n" + query if query and query.strip() else "")
    messages = []
    history = record.get(c["history"]) if c["history"] else None
    if history is not None and not isinstance(history, list):
        raise RecordProblem("malformed_conversations", f"{c['history']!r} is a {type(history).__name__}, not a list")
    for h, pair in enumerate(history or []):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RecordProblem("malformed_conversations", f"history item {h} is not a [question, answer] pair")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages + [{"role": "user", "content": question}, {"role": "assistant", "content": record[c["response"]]}]


def required_keys(entry: DatasetEntry) -> list[str]:
    """The record keys every record needs (the mapped required columns)."""
    return [entry.columns[c] for c in REQUIRED[entry.formatting]]


def optional_keys(entry: DatasetEntry) -> dict[str, str]:
    """Column -> record key of the optional columns the entry names itself (not the defaults)."""
    named = entry.entry.get("columns") or {}
    return {c: k for c, k in named.items() if c not in REQUIRED[entry.formatting]}
