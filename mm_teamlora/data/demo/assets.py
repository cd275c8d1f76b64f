"""The real assets the demo data is made of, each from a package registry, loaded into plain values.

- shapes (PyPI `easy-vqa`): 64x64 images of one coloured shape (circle, rectangle, triangle; 8
  colours) with the package's own questions; its train split feeds training, its test split
  evaluation.
- digits (PyPI `scikit-learn`, `load_digits`): 1,797 handwritten 8x8 digits (UCI), upscaled to
  64x64 dark ink on white; split by a seeded permutation.
- photos (PyPI `scikit-image`, `skimage.data`): 22 photographs and test images bundled with the
  package, captioned from their docstrings (`PHOTO_CAPTIONS`); whole photos are split between
  training and evaluation, each record uses a random crop.
- wordnet (Debian `wordnet-base`): common nouns, their definitions and hypernyms (text-only
  records); lemmas are split between training and evaluation.

A missing asset raises `AssetMissingError` with the command that installs it. Tests build a
`DemoAssets` by hand (tiny images, a WordNet fixture), so they need none of these packages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .wordnet import AssetMissingError, Noun, find_wordnet_dir, load_nouns

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
CORNERS = {"circle": 0, "rectangle": 4, "triangle": 3}

# skimage.data photo -> caption (short and factual, from the function's docstring)
PHOTO_CAPTIONS = {
    "astronaut": "the astronaut Eileen Collins",  # "Color image of the astronaut Eileen Collins."
    "brick": "a brick wall",  # "Brick wall."
    "camera": "a photographer with a camera on a tripod",  # the "camera" (cameraman) test image
    "cell": "a cell floating in saline",  # "Cell floating in saline."
    "chelsea": "a cat",  # "Chelsea the cat."
    "checkerboard": "a checkerboard",  # "Checkerboard image."
    "clock": "a motion-blurred wall clock",  # "Motion blurred clock." (a wall clock)
    "coffee": "a cup of coffee",  # "Coffee cup."
    "coins": "Greek coins from Pompeii",  # "Greek coins from Pompeii."
    "colorwheel": "a color wheel",  # "Color Wheel."
    "grass": "grass",  # "Grass."
    "gravel": "gravel",  # "Gravel"
    "horse": "a black and white silhouette of a horse",  # "Black and white silhouette of a horse."
    "hubble_deep_field": "a deep field of distant galaxies",  # "Hubble eXtreme Deep Field."
    "immunohistochemistry": "stained tissue under a microscope",  # IHC staining of colonic glands
    "logo": "the scikit-image logo",  # "Scikit-image logo"
    "moon": "the surface of the moon",  # "Surface of the moon."
    "page": "a scanned page of printed text",  # "Scanned page." (printed text)
    "retina": "a human retina",  # "Human retina."
    "rocket": "a rocket launch",  # "Launch photo of DSCOVR on Falcon 9 by SpaceX."
    "shepp_logan_phantom": "a model of a head section",  # "Shepp Logan Phantom." (head section)
    "stereo_motorcycle": "a motorcycle",  # left image of the rectified stereo pair
}

PIP_HINT = "pip install easy-vqa==1.0 scikit-learn==1.9.1 scikit-image==0.26.0"


@dataclass
class ShapeImage:
    """One easy-VQA image: a file path or an RGB uint8 array, its shape and colour, its own Q&A."""

    key: str
    image: str | np.ndarray
    shape: str
    color: str
    questions: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Photo:
    name: str
    caption: str
    image: np.ndarray  # RGB uint8 (H, W, 3)


@dataclass
class DemoAssets:
    """Everything the builder draws from; a missing part is an empty list (that source is skipped
    only when it is not asked for)."""

    shapes_train: list[ShapeImage] = field(default_factory=list)
    shapes_test: list[ShapeImage] = field(default_factory=list)
    digit_images: np.ndarray = field(default_factory=lambda: np.zeros((0, 8, 8)))  # values 0..16
    digit_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    photos: list[Photo] = field(default_factory=list)
    nouns: list[Noun] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)


def _missing(package: str, module: str) -> AssetMissingError:
    return AssetMissingError(f"the demo data needs the PyPI package {package!r} (module {module!r}); "
                             f"install the assets with `{PIP_HINT}`")


_COLOR_RE = "|".join(COLORS)
_SHAPE_RE = "|".join(SHAPES)


def shape_and_color(questions: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    """An easy-VQA image's shape and colour, read from its own questions and answers."""
    shape = color = None
    for q, a in questions:
        q = q.lower()
        if a in SHAPES:
            shape = a
        elif a in COLORS:
            color = a
        m = re.search(rf"\b({_COLOR_RE}) shape\b", q)
        if m and ("what is the" in q or ((a == "yes") != (" not " in f" {q} " or " no " in f" {q} "))):
            # "what is the C shape?", or a yes/no question that affirms the colour
            color = color or m.group(1)
        m = re.search(rf"\b({_SHAPE_RE})\b", q)
        if m and ("color" in q or ((a == "yes") != (" not " in f" {q} " or " no " in f" {q} "))):
            shape = shape or m.group(1)
    return shape, color


def load_easy_vqa() -> tuple[list[ShapeImage], list[ShapeImage], str]:
    try:
        import easy_vqa
    except ImportError:
        raise _missing("easy-vqa", "easy_vqa") from None
    out = []
    for split, questions, paths in (("train", easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
                                    ("test", easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths())):
        by_image: dict[int, list[tuple[str, str]]] = {}
        for q, a, image_id in zip(*questions):
            by_image.setdefault(int(image_id), []).append((q, a))
        images = []
        for image_id in sorted(paths):
            qa = by_image.get(image_id, [])
            shape, color = shape_and_color(qa)
            if shape and color:
                images.append(ShapeImage(f"easyvqa-{split}-{image_id:05d}", paths[image_id], shape, color, qa))
        out.append(images)
    return out[0], out[1], _version("easy-vqa")


def load_digits_asset() -> tuple[np.ndarray, np.ndarray, str]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise _missing("scikit-learn", "sklearn") from None
    digits = load_digits()
    return digits.images.astype(np.float64), digits.target.astype(np.int64), _version("scikit-learn")


def _to_rgb_uint8(array: np.ndarray) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = a.astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a, dtype=np.uint8) if hi <= lo else ((a - lo) / (hi - lo) * 255).round().astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.shape[-1] == 4:  # composite on white
        alpha = a[..., 3:4].astype(np.float64) / 255.0
        a = (a[..., :3] * alpha + 255 * (1 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(a[..., :3])


def load_photos() -> tuple[list[Photo], str]:
    try:
        import skimage.data as data
    except ImportError:
        raise _missing("scikit-image", "skimage") from None
    photos = []
    for name, caption in PHOTO_CAPTIONS.items():
        loader = getattr(data, name, None)
        if loader is None:  # not in this scikit-image version: the demo uses the others
            continue
        try:  # every photo listed is bundled: one that fails (or wants a download) is a broken install
            image = loader()
        except Exception as e:
            raise AssetMissingError(f"skimage.data.{name}() failed ({e}); reinstall scikit-image") from None
        if isinstance(image, tuple):
            image = image[0]
        photos.append(Photo(name, caption, _to_rgb_uint8(image)))
    return photos, _version("scikit-image")


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def load_assets(sources: tuple[str, ...], wordnet_dir: str | None = None) -> DemoAssets:
    """Load the real assets named in `sources` (shapes, digits, photos, wordnet)."""
    assets = DemoAssets()
    if "wordnet" in sources:  # cheap to find: fail before the slower loads
        wordnet_dir = find_wordnet_dir(wordnet_dir)
    if "shapes" in sources:
        assets.shapes_train, assets.shapes_test, assets.versions["easy-vqa"] = load_easy_vqa()
    if "digits" in sources:
        assets.digit_images, assets.digit_labels, assets.versions["scikit-learn"] = load_digits_asset()
    if "photos" in sources:
        assets.photos, assets.versions["scikit-image"] = load_photos()
    if "wordnet" in sources:
        assets.nouns = load_nouns(wordnet_dir)
        assets.versions["wordnet"] = f"WordNet 3.0 ({wordnet_dir})"
    return assets


def digit_to_rgb(digit: np.ndarray, size: int = 64) -> np.ndarray:
    """An 8x8 scikit-learn digit (0..16, 16 = ink) as dark ink on white, nearest-upscaled to `size`."""
    grey = (255 - np.clip(digit, 0, 16) * 255.0 / 16.0).round().astype(np.uint8)
    scale = max(1, size // grey.shape[0])
    grey = np.kron(grey, np.ones((scale, scale), dtype=np.uint8))
    return np.ascontiguousarray(np.stack([grey] * 3, axis=-1))


__all__ = ["AssetMissingError", "DemoAssets", "ShapeImage", "Photo", "Noun", "PHOTO_CAPTIONS", "SHAPES",
           "COLORS", "CORNERS", "load_assets", "load_easy_vqa", "load_digits_asset", "load_photos",
           "digit_to_rgb", "shape_and_color", "PIP_HINT"]

