"""Checks on the written demo data: training and evaluation share no image and no text question,
and answer letters are balanced. They read the files back (train.json + images, eval.tsv), so
what is checked is what was written.

- Images: the SHA-256 of the decoded RGB pixels (and size) of every training image and every
  evaluation image; any hash in both sets is a violation (exact duplicates, whatever the file
  encoding or name).
- Questions: for text-only records (no image) the normalised question stem (lower case,
  punctuation dropped, `<image>`, options and answer-format instructions removed, hint included),
  and every double-quoted term in it (the word a WordNet question is about); an evaluation stem
  or term that appears among the training ones is a violation. Image questions share templates
  ("What color is the shape in the image?"), so they are disjoint through their images.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
from collections import Counter

import numpy as np
from PIL import Image

from ...constants import IMAGE_PLACEHOLDER, MC_INSTRUCTION, OPTION_LETTERS
from ..images import to_rgb
from ..tsv import read_tsv

OPTIONS_PER_QUESTION = 4
LETTERS = OPTION_LETTERS[:OPTIONS_PER_QUESTION]
SHORT_INSTRUCTION = "Answer the question using a single word or phrase."  # LLaVA-1.5's short-answer prompt
INSTRUCTIONS = (MC_INSTRUCTION, SHORT_INSTRUCTION)
MMBENCH_COLUMNS = ("index", "question", "hint", *LETTERS, "answer", "category", "l2-category", "split", "image")


class DisjointnessError(ValueError):
    """Training and evaluation data overlap (the message lists the first cases)."""


def pixel_hash(image: Image.Image | np.ndarray) -> str:
    """SHA-256 of an image's RGB uint8 pixels and size."""
    if isinstance(image, Image.Image):
        image = np.asarray(to_rgb(image), dtype=np.uint8)
    array = np.ascontiguousarray(image, dtype=np.uint8)
    digest = hashlib.sha256(repr(array.shape).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def file_hash(path: str) -> str:
    with Image.open(path) as image:
        return pixel_hash(image)


def base64_hash(data: str) -> str:
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        return pixel_hash(image)


def question_stem(text: str) -> str:
    """A prompt without `<image>`, option lines (`A. ...`) and the answer-format instructions."""
    lines = []
    for line in text.replace(IMAGE_PLACEHOLDER, "").splitlines():
        line = line.strip()
        if not line or line in INSTRUCTIONS or re.match(r"^[A-D]\. ", line):
            continue
        lines.append(line)
    return "\n".join(lines)


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def quoted_terms(text: str) -> set[str]:
    return {normalise(t) for t in re.findall(r'"([^"\n]+)"', text)}


def read_mmbench_tsv(path: str) -> list[dict]:
    """The rows of an MMBench-style TSV as dicts of strings (csv quoting, as pandas writes it)."""
    return [row for _, row in read_tsv(path)[1]]


def write_mmbench_tsv(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MMBENCH_COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def letter_counts(answers) -> dict[str, int]:
    counts = Counter(answers)
    return {letter: counts.get(letter, 0) for letter in LETTERS}


def check_letters_balanced(answers, where: str) -> dict[str, int]:
    """Letter counts; raises ValueError when they differ by more than one."""
    counts = letter_counts(answers)
    if sum(counts.values()) and max(counts.values()) - min(counts.values()) > 1:
        raise ValueError(f"{where}: answer letters are not balanced: {counts}")
    return counts


def check_disjoint(train_json: str, eval_tsv: str, image_root: str | None = None, max_listed: int = 5) -> dict:
    """Check that `eval_tsv` shares no image and no text-only question with `train_json`.
    `image_root` defaults to the JSON's folder. Returns counts; raises `DisjointnessError`."""
    image_root = image_root or os.path.dirname(os.path.abspath(train_json))
    with open(train_json, encoding="utf-8") as f:
        records = json.load(f)
    train_images: dict[str, str] = {}  # pixel hash -> first record id
    path_hashes: dict[str, str] = {}
    train_stems: dict[str, str] = {}
    train_terms: dict[str, str] = {}
    for record in records:
        images = record.get("image") or record.get("images") or []
        images = [images] if isinstance(images, str) else images
        for rel in images:
            if rel not in path_hashes:
                path_hashes[rel] = file_hash(os.path.join(image_root, rel))
            train_images.setdefault(path_hashes[rel], record["id"])
        if not images:
            for turn in record["conversations"]:
                if turn["from"] in ("human", "user"):
                    stem = question_stem(turn["value"])
                    train_stems.setdefault(normalise(stem), record["id"])
                    for term in quoted_terms(stem):
                        train_terms.setdefault(term, record["id"])
    rows = read_mmbench_tsv(eval_tsv)
    image_hits, stem_hits, term_hits = [], [], []
    eval_images = set()
    for row in rows:
        if row.get("image"):
            h = base64_hash(row["image"])
            eval_images.add(h)
            if h in train_images:
                image_hits.append(f"eval index {row['index']} has the pixels of training record {train_images[h]!r}")
        else:
            stem = "\n".join(s for s in (row.get("hint", ""), row["question"]) if s)
            key = normalise(stem)
            if key in train_stems:
                stem_hits.append(f"eval index {row['index']} asks {row['question']!r}, as training record "
                                 f"{train_stems[key]!r} does")
            for term in quoted_terms(stem):
                if term in train_terms:
                    term_hits.append(f"eval index {row['index']} asks about {term!r}, as training record "
                                     f"{train_terms[term]!r} does")
    report = {"train_records": len(records), "train_unique_images": len(train_images), "eval_rows": len(rows),
              "eval_unique_images": len(eval_images), "shared_images": len(image_hits),
              "shared_questions": len(stem_hits), "shared_terms": len(term_hits)}
    problems = image_hits + stem_hits + term_hits
    if problems:
        listed = "; ".join(problems[:max_listed]) + (f"; and {len(problems) - max_listed} more"
                                                     if len(problems) > max_listed else "")
        raise DisjointnessError(f"{eval_tsv} overlaps {train_json}: {len(image_hits)} shared images, "
                                f"{len(stem_hits)} shared questions, {len(term_hits)} shared terms: {listed}")
    return report
