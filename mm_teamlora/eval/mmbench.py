"""MMBench TSV files: reading, checking, CircularEval rotations and LLaVA's MMBench prompt.

Layout (the official one, as VLMEvalKit writes it): `index`, `question`, `hint`, option columns
`A`..`I` (an empty cell, or pandas' `nan`, means fewer options), `answer` (absent on test splits),
`category`, `l2-category`, `split`, `image`. `image` holds a base64-encoded picture, or a short
integer naming another row's `index` whose picture it reuses. `source`, `comment` and unknown
columns are ignored.

Two rules for cells left empty: an empty `image` cell makes a text-only question, asked without
`<image>` (the demo's own eval set holds some; `MMBenchData.text_only` counts them); an empty
`answer` is legitimate only outside the dev split (test splits are unlabelled, and such questions
are asked but not scored), so a row whose `split` is `dev` without an answer is `missing_answer`.

Malformed rows (the MMBench section of `data.errors.REASONS`) go through the training data's error
policy: under `raise` the first one stops with a `DataError` naming file, row, line, index and
reason; under `skip` it is counted by reason in `MMBenchData.report`. A file without `index` or `question`
columns is always an error.

CircularEval: question `i` asked with its options rotated `k` places is row `i + k * 1e6`
(`ROTATION_STRIDE`); rotation `k` puts original option `(j + k) mod n` under letter `j`. VLMEvalKit's
circular files already hold those copies, grouped by `index mod 1e6`: `MMBenchData.asked` uses them
as they are and rotates only files that hold single copies.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass, field, replace
from functools import cached_property

from PIL import Image, UnidentifiedImageError

from ..constants import IMAGE_PLACEHOLDER, MC_INSTRUCTION, OPTION_LETTERS
from ..data.errors import DataError, ErrorPolicy, RecordProblem, SourceReport
from ..data.images import to_rgb
from ..data.tsv import read_tsv

ROTATION_STRIDE = 1_000_000
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
        return OPTION_LETTERS[:len(self.options)]

    def rotated(self, k: int) -> "MMBenchQuestion":
        """Options moved `k` places (original option `(j + k) mod n` under letter `j`), index + k*1e6."""
        n = len(self.options)
        options = tuple(self.options[(j + k) % n] for j in range(n))
        answer = None if self.answer is None else OPTION_LETTERS[(OPTION_LETTERS.index(self.answer) - k) % n]
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
    def text_only(self) -> int:
        """Questions asked without a picture (an empty `image` cell)."""
        return sum(1 for q in self.questions if q.image_key is None)

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
    columns, rows = read_tsv(path)
    for needed in ("index", "question"):
        if needed not in columns:
            raise DataError(path, "missing_column", f"no {needed!r} column; columns: {', '.join(columns)}")
    report = SourceReport(name="mmbench", path=path, records=len(rows))
    policy = ErrorPolicy(on_error, report)
    pictures = _Pictures(rows, check_images)
    questions, images, seen = [], {}, set()
    for row_no, (line, row) in enumerate(rows):
        try:
            index = _row_index(row, seen)
            question = _question(row, index, row_no, pictures)
        except RecordProblem as problem:
            policy.fail(DataError(path, problem.reason, problem.detail, index=row_no, line=line,
                                  record_id=_cell(row, "index")))
            continue
        if question.image_key is not None:
            images[question.image_key] = pictures.cells[question.image_key]
        questions.append(question)
    report.kept = len(questions)
    return MMBenchData(path, questions, images, report, columns)


def _row_index(row: dict, seen: set[int]) -> int:
    """The row's index, claimed in `seen` (a later row with the same index is a duplicate, even
    when this row fails a later check)."""
    index = _parse_index(_cell(row, "index"))
    if index is None:
        raise RecordProblem("bad_index", f"index {row.get('index')!r}")
    if index in seen:
        raise RecordProblem("duplicate_index", f"index {index} appears again")
    seen.add(index)
    return index


def _question(row: dict, index: int, row_no: int, pictures: "_Pictures") -> MMBenchQuestion:
    """The checked question of one row; raises `RecordProblem`."""
    question = _cell(row, "question")
    if question is None:
        raise RecordProblem("missing_question", "empty question cell")
    options = _options(row)
    answer, split = _cell(row, "answer"), _cell(row, "split") or ""
    if answer is None and split.lower() == "dev":
        raise RecordProblem("missing_answer", "empty answer cell in a dev-split row (only test splits may lack answers)")
    if answer is not None:
        answer = answer.upper()
        if answer not in OPTION_LETTERS[:len(options)]:
            raise RecordProblem("answer_not_an_option", f"answer {answer!r}, options {OPTION_LETTERS[:len(options)]}")
    return MMBenchQuestion(
        index=index, question=question, options=options, answer=answer, hint=_cell(row, "hint"),
        category=_cell(row, "category") or "", l2_category=_cell(row, "l2-category") or "",
        split=split, image_key=pictures.key(index), row=row_no)


def _options(row: dict) -> tuple[str, ...]:
    """The filled option cells A, B, ... up to the last filled one; a gap or fewer than two is a problem."""
    cells = [_cell(row, letter) for letter in OPTION_LETTERS]
    count = max((i + 1 for i, c in enumerate(cells) if c is not None), default=0)
    if None in cells[:count]:
        raise RecordProblem("option_gap", f"option {OPTION_LETTERS[cells.index(None)]} is empty but "
                                          f"{OPTION_LETTERS[count - 1]} is not")
    if count < 2:
        raise RecordProblem("too_few_options", f"{count} option(s)")
    return tuple(cells[:count])


class _Pictures:
    """Where each row's picture is: its own base64 cell, or a cell naming the index of the row whose
    picture it reuses (followed through chains). With `check`, every distinct picture is decoded once."""

    def __init__(self, rows: list[tuple[int, dict]], check: bool):
        self.cells: dict[int, str | None] = {}  # index -> image cell of the first row holding it
        for _, row in rows:
            index = _parse_index(_cell(row, "index"))
            if index is not None and index not in self.cells:
                self.cells[index] = _cell(row, "image")
        self.check = check
        self.problems: dict[int, str | None] = {}  # image key -> None when it decodes, else why not

    def key(self, index: int) -> int | None:
        """The image key (index of the row holding the base64) of row `index`; None without a
        picture. Raises `RecordProblem` for a broken reference or an undecodable picture."""
        key, seen = index, set()
        while True:
            cell = self.cells.get(key)
            if cell is None:
                if key == index:
                    return None
                raise RecordProblem("image_reference_missing", f"row index {key} has no image")
            if not _REFERENCE.match(cell):
                break
            seen.add(key)
            key = int(cell)
            if key in seen:
                raise RecordProblem("image_reference_missing", f"image references loop back to index {key}")
            if key not in self.cells:
                raise RecordProblem("image_reference_missing", f"image names index {key}, which no row holds")
        if self.check:
            if key not in self.problems:
                self.problems[key] = _decode_problem(cell)
            if self.problems[key] is not None:
                raise RecordProblem("image_not_decodable", f"image of index {key}: {self.problems[key]}")
        return key


def _decode_problem(cell: str) -> str | None:
    try:
        _decode_image(cell)
    except ValueError as e:
        return str(e)
    return None


@dataclass
class PromptConfig:
    """How a question becomes a user turn. The default is LLaVA-1.5's MMBench prompt:
    `<image>\\n{hint}\\n{question}\\nA. {A}\\nB. {B}...\\n{instruction}`."""

    instruction: str = MC_INSTRUCTION
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
