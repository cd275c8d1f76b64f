"""MMBench TSV files: reading, checking, CircularEval rotations and LLaVA's MMBench prompt.

Layout (the official one, as VLMEvalKit writes it): `index`, `question`, `hint`, option columns
`A`..`I` (an empty cell, or pandas' `nan`, means fewer options), `answer` (absent on test splits),
`category`, `l2-category`, `split`, `image`. `image` holds a base64-encoded picture, or a short
integer naming another row's `index` whose picture it reuses. `source`, `comment` and unknown
columns are ignored. An empty `image` cell makes a text-only question.

Malformed rows (`REASONS`) go through the training data's error policy (`data.errors`): under
`raise` the first one stops with a `DataError` naming file, row, line, index and reason; under
`skip` it is counted by reason in `MMBenchData.report`. A file without `index` or `question`
columns is always an error.

CircularEval: question `i` asked with its options rotated `k` places is row `i + k * 1e6`
(`ROTATION_STRIDE`); rotation `k` puts original option `(j + k) mod n` under letter `j`. VLMEvalKit's
circular files already hold those copies, grouped by `index mod 1e6`: `MMBenchData.asked` uses them
as they are and rotates only files that hold single copies.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import re
import sys
from dataclasses import dataclass, field, replace
from functools import cached_property

from PIL import Image, UnidentifiedImageError

from ..constants import IMAGE_PLACEHOLDER
from ..data.errors import DataError, ErrorPolicy, SourceReport
from ..data.images import to_rgb

LETTERS = "ABCDEFGHI"
ROTATION_STRIDE = 1_000_000
DEFAULT_INSTRUCTION = "Answer with the option's letter from the given choices directly."
REASONS = {
    "bad_index": "an index that is not a non-negative integer",
    "duplicate_index": "an index already used by an earlier row (the first is kept)",
    "missing_question": "an empty question",
    "too_few_options": "fewer than two options",
    "option_gap": "an empty option cell before a filled one (letters must run A, B, C, ...)",
    "answer_not_an_option": "an answer that is not the letter of one of the row's options",
    "image_not_decodable": "an image cell that is not base64 of an image PIL can open",
    "image_reference_missing": "an image cell naming a row index the file does not hold (or a loop)",
}
_MISSING = {"", "nan", "none", "null"}  # what pandas writes for an empty cell, and friends
_REFERENCE = re.compile(r"^\d{1,18}$")


def _cell(row: dict, key: str) -> str | None:
    value = row.get(key)
    if value is None or value.strip().lower() in _MISSING:
        return None
    return value.strip()


@dataclass(frozen=True)
class MMBenchQuestion:
    """One row as asked: options in letter order, the answer as a letter (None when unlabelled)."""

    index: int
    question: str
    options: tuple[str, ...]
    answer: str | None = None
    hint: str | None = None
    category: str = ""
    l2_category: str = ""
    split: str = ""
    image_key: int | None = None  # index of the row whose image cell holds the picture; None: no image
    row: int = -1  # 0-based data row of the file

    @property
    def group(self) -> int:
        return self.index % ROTATION_STRIDE

    @property
    def rotation(self) -> int:
        return self.index // ROTATION_STRIDE

    @property
    def letters(self) -> str:
        return LETTERS[:len(self.options)]

    def rotated(self, k: int) -> "MMBenchQuestion":
        """Options moved `k` places (original option `(j + k) mod n` under letter `j`), index + k*1e6."""
        n = len(self.options)
        options = tuple(self.options[(j + k) % n] for j in range(n))
        answer = None if self.answer is None else LETTERS[(LETTERS.index(self.answer) - k) % n]
        return replace(self, index=self.index + k * ROTATION_STRIDE, options=options, answer=answer)


@dataclass
class MMBenchData:
    """The valid questions of one file, their pictures (base64 by image key) and the skip report."""

    path: str
    questions: list[MMBenchQuestion]
    images: dict[int, str]
    report: SourceReport
    columns: list[str] = field(default_factory=list)

    @cached_property
    def has_rotated_copies(self) -> bool:
        return any(q.rotation > 0 for q in self.questions)

    @property
    def has_answers(self) -> bool:
        return any(q.answer is not None for q in self.questions)

    def asked(self, circular: bool) -> list[MMBenchQuestion]:
        """The rows to ask, sorted by (group, rotation). A file with rotated copies: all of them
        (circular) or only rotation 0 (vanilla). A file of single copies: each question once per
        rotation of its options (circular), or once."""
        if self.has_rotated_copies:
            rows = [q for q in self.questions if circular or q.rotation == 0]
        elif circular:
            rows = [q.rotated(k) for q in self.questions for k in range(len(q.options))]
        else:
            rows = list(self.questions)
        return sorted(rows, key=lambda q: (q.group, q.rotation))

    def image(self, key: int) -> Image.Image:
        """The RGB picture stored under `key` (decoded on each call; callers cache features)."""
        return to_rgb(_decode_image(self.images[key]))


def _decode_image(text: str) -> Image.Image:
    try:
        data = base64.b64decode(text)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"not base64 ({e})") from None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:
        raise ValueError(f"{len(data)} bytes that PIL cannot identify as an image") from None
    except (ValueError, OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None
    return image


def _parse_index(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = float(text) if "." in text or "e" in text.lower() else int(text)
    except ValueError:
        return None
    if value != int(value) or value < 0:
        return None
    return int(value)


def read_mmbench(path: str, on_error: str = "raise", check_images: bool = True) -> MMBenchData:
    """Read and check an MMBench TSV. `on_error`: `raise` (the first malformed row stops with a
    `DataError`) or `skip` (counted by reason in the returned report). `check_images` decodes every
    distinct picture once; without it, undecodable pictures fail when first used."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 pictures are long cells
    report = SourceReport(name="mmbench", path=path)
    policy = ErrorPolicy(on_error, report)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        for needed in ("index", "question"):
            if needed not in columns:
                raise DataError(path, "missing_column", f"no {needed!r} column; columns: {', '.join(columns)}")
        raw = []
        for row in reader:
            raw.append((len(raw), reader.line_num, row))
    report.records = len(raw)

    first_image: dict[int, str | None] = {}  # index -> image cell of the first row holding it
    for _, _, row in raw:
        index = _parse_index(_cell(row, "index"))
        if index is not None and index not in first_image:
            first_image[index] = _cell(row, "image")

    decoded: dict[int, str | None] = {}  # image key -> None if fine, else the problem

    def resolve(index: int) -> tuple[int | None, str | None]:
        """(image key, problem) for the picture of row `index`, following references."""
        key, seen = index, set()
        while True:
            cell = first_image.get(key)
            if cell is None:
                return (None, None) if key == index else (None, f"row index {key} has no image")
            if not (len(cell) <= 18 and _REFERENCE.match(cell)):
                break
            seen.add(key)
            key = int(cell)
            if key in seen:
                return None, f"image references loop back to index {key}"
            if key not in first_image:
                return None, f"image names index {key}, which no row holds"
        if check_images and key not in decoded:
            try:
                _decode_image(cell)
                decoded[key] = None
            except ValueError as e:
                decoded[key] = str(e)
        return key, None

    questions, images, seen_index = [], {}, set()
    for row_no, line, row in raw:
        text_index = _cell(row, "index")
        index = _parse_index(text_index)

        def fail(reason: str, detail: str) -> None:
            policy.fail(DataError(path, reason, detail, index=row_no, line=line, record_id=text_index))

        if index is None:
            fail("bad_index", f"index {row.get('index')!r}")
            continue
        if index in seen_index:
            fail("duplicate_index", f"index {index} appears again")
            continue
        seen_index.add(index)
        question = _cell(row, "question")
        if question is None:
            fail("missing_question", "empty question cell")
            continue
        cells = [_cell(row, letter) for letter in LETTERS]
        count = max((i + 1 for i, c in enumerate(cells) if c is not None), default=0)
        if None in cells[:count]:
            fail("option_gap", f"option {LETTERS[cells.index(None)]} is empty but {LETTERS[count - 1]} is not")
            continue
        if count < 2:
            fail("too_few_options", f"{count} option(s)")
            continue
        answer = _cell(row, "answer")
        if answer is not None:
            answer = answer.upper()
            if answer not in LETTERS[:count]:
                fail("answer_not_an_option", f"answer {answer!r}, options {LETTERS[:count]}")
                continue
        key, problem = resolve(index)
        if problem is not None:
            fail("image_reference_missing", problem)
            continue
        if key is not None and decoded.get(key) is not None:
            fail("image_not_decodable", f"image of index {key}: {decoded[key]}")
            continue
        if key is not None:
            images[key] = first_image[key]
        questions.append(MMBenchQuestion(
            index=index, question=question, options=tuple(cells[:count]), answer=answer, hint=_cell(row, "hint"),
            category=_cell(row, "category") or "", l2_category=_cell(row, "l2-category") or "",
            split=_cell(row, "split") or "", image_key=key, row=row_no))
    report.kept = len(questions)
    return MMBenchData(path, questions, images, report, columns)


@dataclass
class PromptConfig:
    """How a question becomes a user turn. The default is LLaVA-1.5's MMBench prompt:
    `<image>\\n{hint}\\n{question}\\nA. {A}\\nB. {B}...\\n{instruction}`."""

    instruction: str = DEFAULT_INSTRUCTION
    use_hint: bool = True
    image_first: bool = True  # `<image>` before the text (LLaVA) or after it
    template: str = "chat"  # data.templates: chat | vicuna_v1 | plain
    system_prompt: str | None = None


def prompt_text(question: MMBenchQuestion, config: PromptConfig | None = None) -> str:
    """The user turn for one (possibly rotated) question."""
    config = config or PromptConfig()
    text = question.question
    if config.use_hint and question.hint:
        text = f"{question.hint}\n{text}"
    for letter, option in zip(question.letters, question.options):
        text += f"\n{letter}. {option}"
    if question.image_key is not None:
        text = f"{IMAGE_PLACEHOLDER}\n{text}" if config.image_first else f"{text}\n{IMAGE_PLACEHOLDER}"
    if config.instruction:
        text += f"\n{config.instruction}"
    return text


def encode_question(question: MMBenchQuestion, template, config: PromptConfig | None = None) -> list[int]:
    """Prompt token ids (one IMAGE_PLACEHOLDER_ID for the picture), as `ConversationTemplate`
    `template` tokenises a generation prompt."""
    return template.encode_prompt([{"role": "user", "content": prompt_text(question, config)}])
