"""Which asset becomes training records and which evaluation questions, source by source.

Disjoint by construction: easy-VQA's train vs test split (test images whose pixels a training image
has are skipped), a seeded split of the digits (held-out digits with a training digit's pixels are
skipped), whole photos, and WordNet lemmas. Evaluation distractors come from the evaluation side
(WordNet falls back to training glosses only when its own are too few). Every draw is seeded by
`Plan`, so a build is a pure function of its seed and sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .assets import DemoAssets, digit_to_rgb
from .disjoint import file_hash, pixel_hash
from .items import Item, digit_items, even_split, noun_items, photo_items, shape_items

SOURCES = ("shapes", "digits", "photos", "wordnet")
MC_CATEGORIES = {"shapes": ("color", "shape", "corners"), "digits": ("digit", "digit_arithmetic"),
                 "photos": ("photo",), "wordnet": ("definition", "hypernym")}
DIGIT_SIZE = 64
DIGIT_EVAL_FRACTION = 0.2
MIN_PHOTOS_PER_SPLIT = 4  # four distinct captions make a multiple-choice question


@dataclass
class Plan:
    """One build's seed and item counts per source (training: half short answers, half multiple
    choice; evaluation: all multiple choice)."""

    seed: int
    n_train: dict[str, int]
    n_eval: dict[str, int]

    def rng(self, source: str, split: str) -> np.random.Generator:
        """The generator of one source's items of one split (`pool`: the split itself)."""
        return np.random.default_rng([self.seed, SOURCES.index(source), {"train": 0, "eval": 1, "pool": 2}[split]])

    def train_counts(self, source: str) -> tuple[int, dict[str, int]]:
        n = self.n_train[source]
        return n - n // 2, even_split(n // 2, MC_CATEGORIES[source])

    def eval_counts(self, source: str) -> tuple[int, dict[str, int]]:
        return 0, even_split(self.n_eval.get(source, 0), MC_CATEGORIES[source])


def image_hash(image: str | np.ndarray) -> str:
    return file_hash(image) if isinstance(image, str) else pixel_hash(image)


def shapes(assets: DemoAssets, plan: Plan) -> tuple[list[Item], list[Item]]:
    if not assets.shapes_train or not assets.shapes_test:
        raise ValueError("the shapes source needs easy-VQA train and test images")
    train = shape_items(assets.shapes_train, *plan.train_counts("shapes"), plan.rng("shapes", "train"))
    need = plan.n_eval.get("shapes", 0)
    if not need:
        return train, []
    train_hashes = {image_hash(i.image) for i in {i.image_key: i for i in train}.values()}
    candidates = list(assets.shapes_test)
    pool = []
    for k in plan.rng("shapes", "eval").permutation(len(candidates)):
        if len(pool) >= need:
            break
        if image_hash(candidates[k].image) not in train_hashes:
            pool.append(candidates[k])
    if not pool:
        raise ValueError("every easy-VQA test image has the pixels of a training image")
    return train, shape_items(pool, *plan.eval_counts("shapes"), plan.rng("shapes", "eval"))


def digits(assets: DemoAssets, plan: Plan) -> tuple[list[Item], list[Item]]:
    labels = assets.digit_labels
    if len(labels) < 8:
        raise ValueError("the digits source needs at least 8 digits")
    order = [int(i) for i in plan.rng("digits", "pool").permutation(len(labels))]
    n_eval_pool = max(1, int(round(len(order) * DIGIT_EVAL_FRACTION)))
    train_idx = order[n_eval_pool:]
    pixels = {i: digit_to_rgb(assets.digit_images[i], DIGIT_SIZE) for i in order}
    train_hashes = {pixel_hash(pixels[i]) for i in train_idx}
    eval_idx = [i for i in order[:n_eval_pool] if pixel_hash(pixels[i]) not in train_hashes]
    train = digit_items(train_idx, labels, pixels, *plan.train_counts("digits"), plan.rng("digits", "train"))
    if not plan.n_eval.get("digits"):
        return train, []
    if not eval_idx:
        raise ValueError("every held-out digit has the pixels of a training digit")
    return train, digit_items(eval_idx, labels, pixels, *plan.eval_counts("digits"), plan.rng("digits", "eval"))


def photos(assets: DemoAssets, plan: Plan) -> tuple[list[Item], list[Item]]:
    pictures = assets.photos
    if len(pictures) < 2 * MIN_PHOTOS_PER_SPLIT:
        raise ValueError(f"the photos source needs at least {2 * MIN_PHOTOS_PER_SPLIT} photos, got {len(pictures)}")
    order = [pictures[i] for i in plan.rng("photos", "pool").permutation(len(pictures))]
    n_eval_photos = max(MIN_PHOTOS_PER_SPLIT, int(round(len(pictures) * 0.25)))
    eval_photos, train_photos = order[:n_eval_photos], order[n_eval_photos:]
    train = photo_items(train_photos, *plan.train_counts("photos"), plan.rng("photos", "train"), "train")
    if not plan.n_eval.get("photos"):
        return train, []
    return train, photo_items(eval_photos, *plan.eval_counts("photos"), plan.rng("photos", "eval"), "eval")


def wordnet(assets: DemoAssets, plan: Plan) -> tuple[list[Item], list[Item]]:
    nouns = assets.nouns
    if len(nouns) < 16:
        raise ValueError(f"the wordnet source needs at least 16 nouns, got {len(nouns)}")
    order = [nouns[i] for i in plan.rng("wordnet", "pool").permutation(len(nouns))]
    need = plan.n_eval.get("wordnet", 0)
    n_eval_pool = max(8, min(len(order) // 4, 2 * need)) if need else 0
    eval_pool, train_pool = order[:n_eval_pool], order[n_eval_pool:]
    train = noun_items(train_pool, *plan.train_counts("wordnet"), plan.rng("wordnet", "train"), spare=[])
    if not need:
        return train, []
    return train, noun_items(eval_pool, *plan.eval_counts("wordnet"), plan.rng("wordnet", "eval"), spare=train_pool)


SPLITS = {"shapes": shapes, "digits": digits, "photos": photos, "wordnet": wordnet}  # in SOURCES order
