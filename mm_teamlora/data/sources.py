"""Reading instruction files and turning each record into one checked `Conversation`.

Files: a JSON array (`.json`), JSON lines (`.jsonl`, or a `.json` whose first character is `{`),
or parquet. Records are read here rather than through `datasets.load_dataset("json")` because a bad
record must be reported by index, line and id (Arrow's schema inference stops at the first odd
value), and must be skippable one by one.

Formats (`format:` of a source; `auto` picks one from the first record that is an object):
- `llava`: `id`, `image` (a path, or a list) or `images` (a list), `conversations` of
  `{"from": "human"|"gpt"|"system", "value": str}`; also the text-only conversation form.
- `alpaca`: `instruction`, optional `input` (appended after a newline), `output`, optional `system`.
- `messages` (ShareGPT/OpenAI form of other tuning toolkits): `messages` of `{"role", "content"}`
  with `images`; content may also be a list of parts `{"type": "text", "text"}` / `{"type": "image"}`.

Every conversation leaves here with roles `system` (first only), then `user`/`assistant`
alternating, starting with the user and ending with the assistant; contents stripped of leading and
trailing whitespace; exactly one `<image>` per image. Images given with no `<image>` at all get
`<image>\\n` per image prepended to the first user turn, as LLaVA does (noted in the report).

Text is checked before anything reaches a library: every turn, id and image path must encode as
UTF-8 (`json` decodes a lone surrogate such as `"\\ud800"` without complaint; tokenizers and Arrow
do not: `invalid_text`) and hold no control character other than tab, newline and carriage return
(`control_characters`). Only images are supported: a `videos` / `audios` field (LLaMA-Factory's
video and audio demos) or a `<video>` / `<audio>` placeholder in a turn is `unsupported_modality`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Iterator

from ..constants import IMAGE_PLACEHOLDER
from .errors import DataError, RecordProblem

FORMATS = ("auto", "llava", "alpaca", "messages")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# C0 controls and DEL, except tab, newline and carriage return
CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
UNSUPPORTED_FIELDS = ("videos", "video", "audios", "audio")
UNSUPPORTED_PLACEHOLDERS = ("<video>", "<audio>")


@dataclass
class RawRecord:
    """One record as read: its 0-based index, its line (JSONL only), and the value or a problem."""

    index: int
    line: int | None
    value: object = None
    problem: RecordProblem | None = None


@dataclass
class Conversation:
    """A checked conversation: `messages` of {"role", "content"}; `images` as written (relative)."""

    id: str
    messages: list[dict]
    images: list[str] = field(default_factory=list)
    notes: dict[str, dict] = field(default_factory=dict)  # NOTES code -> {"detail": ..., ...} for the report


def read_records(path: str, max_records: int | None = None) -> Iterator[RawRecord]:
    """Yield the records of a JSON, JSONL or parquet file in order. A file that cannot be read as a
    whole (bad JSON array, non-UTF-8 JSON array) raises `DataError`; bad JSONL lines are yielded
    as records carrying their problem, so the error policy decides."""
    if path.endswith(".parquet"):
        yield from _read_parquet(path, max_records)
        return
    with open(path, "rb") as f:
        head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    if path.endswith(".jsonl") or head.startswith(b"{"):
        yield from _read_jsonl(path, max_records)
    else:
        yield from _read_json_array(path, max_records)


def _read_json_array(path: str, max_records: int | None) -> Iterator[RawRecord]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(path, "invalid_utf8", f"byte {e.start} ({data[e.start:e.start + 1]!r})",
                        line=line) from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, "invalid_json", f"{e.msg} at column {e.colno}", line=e.lineno) from None
    except (ValueError, RecursionError) as e:
        raise DataError(path, "invalid_json", f"{type(e).__name__}: {e}") from None
    if not isinstance(records, list):
        raise DataError(path, "invalid_json", f"expected a JSON array of records, got {type(records).__name__}")
    for i, value in enumerate(records[:max_records] if max_records is not None else records):
        yield RawRecord(i, None, value)


def _read_jsonl(path: str, max_records: int | None) -> Iterator[RawRecord]:
    index = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if max_records is not None and index >= max_records:
                return
            if not raw.strip():
                continue  # blank lines are not records
            try:
                yield RawRecord(index, line_no, json.loads(raw.decode("utf-8-sig" if line_no == 1 else "utf-8")))
            except UnicodeDecodeError as e:
                yield RawRecord(index, line_no, problem=RecordProblem(
                    "invalid_utf8", f"byte {e.start} of the line ({raw[e.start:e.start + 1]!r})"))
            except json.JSONDecodeError as e:
                yield RawRecord(index, line_no, problem=RecordProblem("invalid_json", f"{e.msg} at column {e.colno}"))
            except (ValueError, RecursionError) as e:  # nesting too deep, an integer over Python's digit limit
                yield RawRecord(index, line_no, problem=RecordProblem("invalid_json", f"{type(e).__name__}: {e}"))
            index += 1


def _read_parquet(path: str, max_records: int | None) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for value in batch.to_pylist():
            if max_records is not None and index >= max_records:
                return
            yield RawRecord(index, None, value)
            index += 1


def detect_format(record: dict) -> str | None:
    """The format a record's keys say it is in, or None."""
    if "conversations" in record:
        return "llava"
    if "messages" in record:
        return "messages"
    if "instruction" in record or "output" in record:
        return "alpaca"
    return None


def record_id(record: dict) -> str | None:
    """The record's own id as a string (ints are accepted: some LLaVA files use them), or None."""
    if "id" not in record:
        return None
    rid = record["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or (isinstance(rid, str) and not rid.strip()):
        raise RecordProblem("bad_id", f"id {rid!r}")
    return check_text(str(rid), "id")


def check_text(text: str, where: str) -> str:
    """`text` when it encodes as UTF-8 and holds no control character but tab, newline and CR;
    else raise `RecordProblem` (`invalid_text`, `control_characters`) naming `where` and the position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordProblem("invalid_text", f"{where}: {text[e.start]!r} at character {e.start} "
                                            f"({e.reason}: a lone UTF-16 surrogate)") from None
    bad = CONTROL_CHARACTERS.search(text)
    if bad is not None:
        raise RecordProblem("control_characters", f"{where}: {bad.group()!r} at character {bad.start()}")
    return text


def reported_id(record: object) -> str | None:
    """The id to name a record by in reports, also when the record is bad: its `record_id`, or
    None when it is not an object or has no usable id."""
    if not isinstance(record, dict):
        return None
    try:
        return record_id(record)
    except RecordProblem:
        return None


def parse_record(record: object, fmt: str, index: int) -> Conversation:
    """Turn one raw record into a checked `Conversation`, or raise `RecordProblem`."""
    if not isinstance(record, dict):
        raise RecordProblem("not_an_object", f"got {type(record).__name__}")
    rid = record_id(record)
    for key in UNSUPPORTED_FIELDS:
        if record.get(key) not in (None, [], ""):
            raise RecordProblem("unsupported_modality", f"{key!r} field: only images are supported")
    if fmt == "llava":
        messages, images = _from_llava(record)
    elif fmt == "messages":
        messages, images = _from_messages(record)
    elif fmt == "alpaca":
        messages, images = _from_alpaca(record)
    else:
        raise ValueError(fmt)
    conv = Conversation(id=rid if rid is not None else f"#{index}", messages=messages, images=images)
    check_conversation(conv)
    return conv


def _image_list(record: dict, keys: tuple[str, ...]) -> list[str]:
    present = [k for k in keys if record.get(k) is not None]
    if len(present) > 1:
        raise RecordProblem("bad_image_field", f"both {present[0]!r} and {present[1]!r} given")
    if not present:
        return []
    value = record[present[0]]
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list):
        raise RecordProblem("bad_image_field", f"{present[0]!r} is a {type(value).__name__}")
    for p in paths:
        if not isinstance(p, str):
            raise RecordProblem("non_string_value", f"image path {p!r} in {present[0]!r}")
        if not p.strip():
            raise RecordProblem("bad_image_field", f"empty image path in {present[0]!r}")
    return list(paths)


def _turns(record: dict, key: str) -> list:
    if key not in record or record[key] is None:
        raise RecordProblem("missing_conversations", f"no {key!r} field")
    turns = record[key]
    if not isinstance(turns, list):
        raise RecordProblem("malformed_conversations", f"{key!r} is a {type(turns).__name__}, not a list")
    if not turns:
        raise RecordProblem("empty_conversations", f"{key!r} is empty")
    return turns


def _role(value: object, turn: int) -> str:
    if not isinstance(value, str):
        raise RecordProblem("non_string_value", f"turn {turn}: role {value!r}")
    if value.lower() not in ROLES:
        raise RecordProblem("unknown_role", f"turn {turn}: role {value!r}")
    return ROLES[value.lower()]


def _from_llava(record: dict) -> tuple[list[dict], list[str]]:
    images = _image_list(record, ("image", "images"))
    messages = []
    for t, turn in enumerate(_turns(record, "conversations")):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RecordProblem("malformed_conversations", f"turn {t} is not an object with 'from' and 'value'")
        role = _role(turn["from"], t)
        if not isinstance(turn["value"], str):
            raise RecordProblem("non_string_value", f"turn {t}: value {turn['value']!r:.60}")
        messages.append({"role": role, "content": turn["value"]})
    return messages, images


def _from_messages(record: dict) -> tuple[list[dict], list[str]]:
    images = _image_list(record, ("images",))
    messages = []
    for t, turn in enumerate(_turns(record, "messages")):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise RecordProblem("malformed_conversations", f"message {t} is not an object with 'role' and 'content'")
        role = _role(turn["role"], t)
        messages.append({"role": role, "content": _content_text(turn["content"], t)})
    return messages, images


def _content_text(content: object, turn: int) -> str:
    """A string, or a list of parts: text parts joined, each image part an `<image>`."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RecordProblem("non_string_value", f"message {turn}: content {content!r:.60}")
    text = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            text.append(IMAGE_PLACEHOLDER)
        elif kind == "text" and isinstance(part.get("text"), str):
            text.append(part["text"])
        else:
            raise RecordProblem("malformed_conversations", f"message {turn}: content part {part!r:.60}")
    return "".join(text)


def _from_alpaca(record: dict) -> tuple[list[dict], list[str]]:
    if record.get("image") is not None or record.get("images") is not None:
        raise RecordProblem("bad_image_field", "alpaca records are text-only")
    for key in ("instruction", "output"):
        if record.get(key) is None:
            raise RecordProblem("missing_field", f"no {key!r}")
    for key in ("instruction", "input", "output", "system"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise RecordProblem("non_string_value", f"{key!r} is {record[key]!r:.60}")
    question = record["instruction"] + ("\n" + record["input"] if (record.get("input") or "").strip() else "")
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return messages + [{"role": "user", "content": question}, {"role": "assistant", "content": record["output"]}], []


def check_conversation(conv: Conversation) -> None:
    """Strip contents, check roles, order, emptiness and `<image>` counts (see the module doc)."""
    messages = conv.messages
    for t, m in enumerate(messages):
        check_text(m["content"], f"turn {t}")
        for placeholder in UNSUPPORTED_PLACEHOLDERS:
            if placeholder in m["content"]:
                raise RecordProblem("unsupported_modality", f"turn {t}: {placeholder} (only images are supported)")
        m["content"] = m["content"].strip()
    for path in conv.images:
        check_text(path, f"image path {path!r:.60}")
    if messages[0]["role"] == "system":
        messages = messages[1:]
        if not messages:
            raise RecordProblem("empty_conversations", "only a system turn")
    for t, m in enumerate(messages):
        expected = "user" if t % 2 == 0 else "assistant"
        if m["role"] == expected:
            continue
        if t == 0 and m["role"] == "assistant":
            raise RecordProblem("starts_with_assistant", "the first turn is the assistant's")
        raise RecordProblem("role_order", f"turn {t} is {m['role']!r}, expected {expected!r}")
    if messages[-1]["role"] != "assistant":
        raise RecordProblem("ends_with_user", f"{len(messages)} turns, the last is the user's")
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    prepend = placeholders == 0 and bool(conv.images)
    for t, m in enumerate(messages):
        if m["role"] == "assistant":
            if IMAGE_PLACEHOLDER in m["content"]:
                raise RecordProblem("image_in_answer", f"turn {t}")
            if not m["content"]:
                raise RecordProblem("empty_answer", f"turn {t}")
        elif not m["content"] and not (t == 0 and prepend):
            raise RecordProblem("empty_question", f"turn {t}")
    if conv.messages[0]["role"] == "system" and IMAGE_PLACEHOLDER in conv.messages[0]["content"]:
        raise RecordProblem("image_count_mismatch", "<image> in the system turn")
    if prepend:
        first = messages[0]
        first["content"] = ((IMAGE_PLACEHOLDER + "\n") * len(conv.images) + first["content"]).rstrip()
        conv.notes["image_placeholder_prepended"] = {
            "detail": f"{len(conv.images)} <image> prepended to the first user turn"}
    elif placeholders != len(conv.images):
        raise RecordProblem("image_count_mismatch", f"{placeholders} <image> placeholders, {len(conv.images)} images")
