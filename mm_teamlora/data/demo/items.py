"""Demo records: one `Item` per training record or evaluation question, built from the assets.

Each source makes short-answer items and multiple-choice items (four options, one correct); the
categories and their questions are listed in `build.py`. Distractors are drawn from the same split
as the item, and `assign_letters` places correct answers round-robin so letters stay balanced.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ...constants import MC_INSTRUCTION
from .assets import COLORS, CORNERS, SHAPES, ShapeImage
from .disjoint import LETTERS, SHORT_INSTRUCTION
from .wordnet import Noun

L2_CATEGORIES = {"color": "perception", "shape": "perception", "corners": "reasoning", "digit": "perception",
                 "digit_arithmetic": "reasoning", "photo": "perception", "definition": "knowledge",
                 "hypernym": "knowledge"}
PHOTO_SIZE = 160  # longer side of a photo crop, pixels


@dataclass
class Item:
    """One question before it is written: its answer text and, for multiple choice, 3 distractors."""

    source: str
    category: str  # an MC category, or "short"
    question: str
    answer: str
    distractors: list[str] | None = None  # None: a short-answer item
    hint: str = ""
    image: str | np.ndarray | None = None  # a PNG path (copied as is) or RGB uint8 pixels
    image_key: str | None = None  # file stem under images/, unique per distinct image
    options: list[str] = field(default_factory=list)  # filled when the letter is assigned
    letter: str = ""


def largest_remainder(total: int, weights: dict[str, float]) -> dict[str, int]:
    if not weights:
        return {}
    s = sum(weights.values())
    raw = {k: total * w / s for k, w in weights.items()}
    counts = {k: int(np.floor(v)) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (-(raw[k] - counts[k]), list(weights).index(k)))[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def even_split(total: int, names: tuple[str, ...]) -> dict[str, int]:
    return largest_remainder(total, {n: 1.0 for n in names})


def _cycle(pool: list, n: int, rng: np.random.Generator) -> list:
    """`n` items of `pool` in a seeded order, each used once before any is used again."""
    if not pool:
        raise ValueError("empty pool")
    out = []
    while len(out) < n:
        out.extend(pool[i] for i in rng.permutation(len(pool)))
    return out[:n]


def _key(value):
    return value.lower() if isinstance(value, str) else value


def _pick(rng: np.random.Generator, candidates, k: int, exclude=()) -> list:
    """`k` distinct candidates (case-insensitive for strings) not in `exclude`, drawn with `rng`."""
    seen, pool = {_key(e) for e in exclude}, []
    for c in candidates:
        if _key(c) not in seen:
            seen.add(_key(c))
            pool.append(c)
    if len(pool) < k:
        raise ValueError(f"need {k} distractors, only {len(pool)} candidates")
    return [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _sentence(text: str) -> str:
    text = _cap(text.strip())
    return text if text.endswith((".", "!", "?")) else text + "."


# ---------------------------------------------------------------------------------------------
# items per source


def _shape_mc(img: ShapeImage, category: str, rng: np.random.Generator) -> Item:
    if category == "color":
        return Item("shapes", category, "What color is the shape in the image?", img.color,
                    _pick(rng, COLORS, 3, exclude=[img.color]))
    if category == "shape":
        answer = f"{img.color} {img.shape}"
        same_color = [f"{img.color} {s}" for s in SHAPES if s != img.shape]
        same_shape = [f"{c} {img.shape}" for c in COLORS if c != img.color]
        first = [same_color[rng.integers(len(same_color))], same_shape[rng.integers(len(same_shape))]]
        rest = _pick(rng, same_color + same_shape, 1, exclude=first + [answer])
        return Item("shapes", category, "Which description matches the shape in the image?", answer, first + rest)
    if category == "corners":
        answer = str(CORNERS[img.shape])
        return Item("shapes", category, "How many corners does the shape in the image have?", answer,
                    _pick(rng, ["0", "3", "4", "5", "6"], 3, exclude=[answer]))
    raise ValueError(category)


def shape_items(pool: list[ShapeImage], n_short: int, n_mc: dict[str, int], rng) -> list[Item]:
    images = _cycle(pool, n_short + sum(n_mc.values()), rng)
    items = []
    for img in images[:n_short]:
        q, a = img.questions[rng.integers(len(img.questions))] if img.questions else (
            "What color is the shape?", img.color)
        items.append(Item("shapes", "short", _cap(q.strip()), a))
    rest = iter(images[n_short:])
    for category, n in n_mc.items():
        items.extend(_shape_mc(next(rest), category, rng) for _ in range(n))
    for item, img in zip(items, images):
        item.image, item.image_key = img.image, img.key
    return items


def digit_items(indices: list[int], labels: np.ndarray, pixels: dict[int, np.ndarray], n_short: int,
                 n_mc: dict[str, int], rng) -> list[Item]:
    chosen = _cycle(indices, n_short + sum(n_mc.values()), rng)
    items = []
    for j, idx in enumerate(chosen[:n_short]):
        d = int(labels[idx])
        kind = j % 3
        if kind == 0:
            item = Item("digits", "short", "What digit is written in the image?", str(d))
        elif kind == 1:
            item = Item("digits", "short", "Is the digit in the image odd or even?", "odd" if d % 2 else "even")
        else:
            k = int(rng.integers(1, 5))
            item = Item("digits", "short", f"What is the digit in the image plus {k}?", str(d + k))
        items.append(item)
    rest = iter(chosen[n_short:])
    for category, n in n_mc.items():
        for _ in range(n):
            d = int(labels[next(rest)])
            if category == "digit":
                item = Item("digits", category, "Which digit is written in the image?", str(d),
                            [str(x) for x in _pick(rng, range(10), 3, exclude=[d])])
            else:
                k = int(rng.integers(1, 5))
                near = [d + k + o for o in (-3, -2, -1, 1, 2, 3) if d + k + o >= 0]
                item = Item("digits", category, f"What is the digit in the image plus {k}?", str(d + k),
                            [str(x) for x in _pick(rng, near, 3)], hint="The image shows one handwritten digit.")
            items.append(item)
    for item, idx in zip(items, chosen):
        item.image, item.image_key = pixels[idx], f"digit-{int(idx):04d}"
    return items


def _photo_crop(image: np.ndarray, rng: np.random.Generator, size: int = PHOTO_SIZE) -> np.ndarray:
    """A random crop (45-100% of the area, aspect 3:4-4:3), maybe mirrored, longer side `size`."""
    h, w = image.shape[:2]
    area = rng.uniform(0.45, 1.0) * h * w
    ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw = int(min(w, max(8, round(np.sqrt(area * ratio)))))
    ch = int(min(h, max(8, round(np.sqrt(area / ratio)))))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = image[y0:y0 + ch, x0:x0 + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    scale = size / max(ch, cw)
    out = Image.fromarray(np.ascontiguousarray(crop)).resize((max(8, round(cw * scale)), max(8, round(ch * scale))),
                                                            Image.BICUBIC)
    return np.asarray(out, dtype=np.uint8)


def photo_items(photos, n_short: int, n_mc: dict[str, int], rng, split: str) -> list[Item]:
    chosen = _cycle(photos, n_short + sum(n_mc.values()), rng)
    captions = sorted({p.caption for p in photos})
    items = [Item("photos", "short", f"What does the image show?\n{SHORT_INSTRUCTION}", p.caption)
             for p in chosen[:n_short]]
    items += [Item("photos", "photo", "Which caption best describes the image?", p.caption,
                   _pick(rng, captions, 3, exclude=[p.caption])) for p in chosen[n_short:]]
    counts: Counter = Counter()
    for item, photo in zip(items, chosen):
        item.image = _photo_crop(photo.image, rng)
        item.image_key = f"photo-{split}-{photo.name}-{counts[photo.name]:04d}"
        counts[photo.name] += 1
    return items


def noun_items(pool: list[Noun], n_short: int, n_mc: dict[str, int], rng, spare: list[Noun]) -> list[Item]:
    chosen = _cycle(pool, n_short + sum(n_mc.values()), rng)
    glosses = [n.gloss for n in pool] + [n.gloss for n in spare]  # the split's own first
    hypernyms = [n.hypernym for n in pool] + [n.hypernym for n in spare]
    items = []
    for j, noun in enumerate(chosen[:n_short]):
        if j % 2 == 0:
            items.append(Item("wordnet", "short", f'What does the word "{noun.lemma}" mean?', _sentence(noun.gloss)))
        else:
            items.append(Item("wordnet", "short",
                              f'What broader category does the word "{noun.lemma}" belong to?\n{SHORT_INSTRUCTION}',
                              noun.hypernym))
    rest = iter(chosen[n_short:])
    for category, n in n_mc.items():
        for _ in range(n):
            noun = next(rest)
            if category == "definition":
                items.append(Item("wordnet", category, f'What is the meaning of the word "{noun.lemma}"?', noun.gloss,
                                  _pick_first(rng, glosses, 3, exclude=[noun.gloss], own=len(pool))))
            else:
                items.append(Item("wordnet", category,
                                  f'Which word names a broader category that "{noun.lemma}" belongs to?',
                                  noun.hypernym,
                                  _pick_first(rng, hypernyms, 3, own=len(pool),
                                              exclude=[noun.hypernym, noun.lemma, *noun.ancestors])))
    return items


def _pick_first(rng, candidates: list[str], k: int, exclude, own: int) -> list[str]:
    """Distractors from the split's own candidates (`candidates[:own]`), the rest only if too few."""
    try:
        return _pick(rng, candidates[:own], k, exclude)
    except ValueError:
        return _pick(rng, candidates, k, exclude)


# ---------------------------------------------------------------------------------------------
# letters, writing


def assign_letters(items: list[Item], rng: np.random.Generator) -> None:
    """Round-robin letters over the multiple-choice items, category by category (a counter that
    carries over), so each category's and the split's counts differ by at most one; the answer
    goes to its letter and the distractors fill the other places in a seeded order."""
    counter = 0
    categories = sorted({i.category for i in items if i.distractors is not None})
    for category in categories:
        group = [i for i in items if i.category == category and i.distractors is not None]
        start = int(rng.integers(4)) if category == categories[0] else counter % 4
        for j, item in enumerate(group):
            slot = (start + j) % 4
            others = [item.distractors[k] for k in rng.permutation(3)]
            item.options = others[:slot] + [item.answer] + others[slot:]
            item.letter = LETTERS[slot]
        counter = start + len(group)


def item_prompt(item: Item) -> str:
    text = item.question
    if item.distractors is not None:
        parts = ([item.hint] if item.hint else []) + [item.question]
        parts += [f"{letter}. {option}" for letter, option in zip(LETTERS, item.options)]
        text = "\n".join(parts + [MC_INSTRUCTION])
    elif item.source in ("shapes", "digits"):
        text = f"{item.question}\n{SHORT_INSTRUCTION}"
    return text
