"""Image paths, up-front checks and loading to RGB.

Checks run once per unique file during prepare/check (threads; PIL releases the GIL for file reads
and decoding), so a bad image is reported before training rather than crashing it mid-run: the
file exists, is a non-empty regular file, PIL identifies it, its size passes `ImageCheckConfig`
(min side, aspect ratio, a pixel limit that guards against decompression bombs), and
`Image.verify()` passes (a full check of PNG chunk CRCs; for JPEG only the header). A full decode
of every image, which also finds truncated JPEGs, is `full_decode: true`.

Paths are relative to the source's image root; absolute paths and paths that leave the root
lexically ('..') are errors. Symbolic links inside the root are followed (LLaVA data roots are
often links to shared storage).

Loading converts every mode to RGB: 16-bit greyscale is rescaled to 8 bits (PIL's own conversion
clips everything above 255 to white), CMYK and palette images convert, transparency is composited
on white (PIL's `convert("RGB")` would keep whatever colour the transparent pixels hold), and the
EXIF orientation is applied so the model sees the image upright.
"""

from __future__ import annotations

import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConfigError, RecordProblem


@dataclass
class ImageCheckConfig:
    """Limits for the up-front image checks (the defaults accept every image of LLaVA-1.5's mix)."""

    min_side: int = 8  # pixels; 1x1 and other degenerate images are errors
    max_aspect_ratio: float = 20.0  # long side / short side
    max_pixels: int = 89_478_485  # width * height; PIL's own decompression-bomb threshold
    full_decode: bool = False  # also decode every image (slower; finds truncated JPEGs)
    num_workers: int = 8  # threads for the checks

    def validate(self) -> "ImageCheckConfig":
        for name in ("min_side", "max_pixels", "num_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"images.{name} must be a positive integer, got {value!r}")
        if isinstance(self.max_aspect_ratio, bool) or not isinstance(self.max_aspect_ratio, (int, float)) \
                or self.max_aspect_ratio < 1:
            raise ConfigError(f"images.max_aspect_ratio must be a number >= 1, got {self.max_aspect_ratio!r}")
        if not isinstance(self.full_decode, bool):
            raise ConfigError(f"images.full_decode must be true or false, got {self.full_decode!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_image_path(image_root: str | None, path: str) -> str:
    """The absolute path of an image given relative to `image_root`; raises `RecordProblem`."""
    if os.path.isabs(path) or path.startswith("~"):
        raise RecordProblem("absolute_image_path", repr(path))
    normal = os.path.normpath(path)
    if normal == ".." or normal.startswith(".." + os.sep):
        raise RecordProblem("image_path_escapes_root", repr(path))
    if image_root is None:
        raise RecordProblem("no_image_root", f"image {path!r}")
    return os.path.join(image_root, normal)


def _open(path: str) -> Image.Image:
    """`Image.open` with our own pixel limit in charge (PIL's warning silenced, its error mapped)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except Image.DecompressionBombError as e:
            raise RecordProblem("image_too_large", f"{path}: {e}") from None
        except UnidentifiedImageError:
            raise RecordProblem("image_not_an_image", f"{path}: PIL cannot identify it") from None
        except OSError as e:
            raise RecordProblem("image_corrupt", f"{path}: {e}") from None
        except Exception as e:  # a PIL plugin failing on odd header bytes (ValueError, struct.error, ...)
            raise RecordProblem("image_corrupt", f"{path}: {type(e).__name__}: {e}") from None


def _check_size(path: str, size: tuple[int, int], config: ImageCheckConfig) -> None:
    width, height = size
    if width * height > config.max_pixels:
        raise RecordProblem("image_too_large", f"{path}: {width}x{height} > {config.max_pixels} pixels")
    if min(width, height) < config.min_side:
        raise RecordProblem("image_too_small", f"{path}: {width}x{height}, min side {config.min_side}")
    if max(width, height) / min(width, height) > config.max_aspect_ratio:
        raise RecordProblem("image_extreme_aspect_ratio",
                            f"{path}: {width}x{height}, ratio above {config.max_aspect_ratio:g}")


def check_image(path: str, config: ImageCheckConfig) -> None:
    """Raise `RecordProblem` when the image at `path` is unusable (see the module doc)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise RecordProblem("image_missing", path) from None
    except OSError as e:
        raise RecordProblem("image_missing", f"{path}: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise RecordProblem("image_not_an_image", f"{path}: not a regular file")
    if st.st_size == 0:
        raise RecordProblem("image_empty_file", path)
    with _open(path) as image:
        _check_size(path, image.size, config)
        try:
            image.verify()
        except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ... on bad data
            raise RecordProblem("image_corrupt", f"{path}: {type(e).__name__}: {e}") from None
    if config.full_decode:
        with _open(path) as image:
            try:
                image.load()
            except Exception as e:
                raise RecordProblem("image_corrupt", f"{path}: {type(e).__name__}: {e}") from None


def check_images(paths: list[str], config: ImageCheckConfig) -> dict[str, RecordProblem]:
    """Check many files in parallel; returns the problem of each bad path (good paths are absent)."""

    def one(path: str) -> RecordProblem | None:
        try:
            check_image(path, config)
        except RecordProblem as problem:
            return problem
        except Exception as e:  # any other library error fails this image alone, not the whole source
            return RecordProblem("image_corrupt", f"{path}: {type(e).__name__}: {e}")
        return None

    if not paths:
        return {}
    with ThreadPoolExecutor(max_workers=min(config.num_workers, len(paths))) as pool:
        results = list(pool.map(one, paths, chunksize=64))
    return {p: r for p, r in zip(paths, results) if r is not None}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: 16-bit rescaled, transparency on white, everything else converted."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit greyscale (mode I holds 16-bit PNGs in older Pillow): scale 0..65535 to 0..255
        array = np.asarray(image).astype(np.float64).clip(0, 65535)
        image = Image.fromarray(np.round(array / 257.0).astype(np.uint8), mode="L")
    elif mode == "F":
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 if np.nanmax(array, initial=0.0) <= 1.0 else 1.0
        image = Image.fromarray(np.nan_to_num(array * scale).clip(0, 255).round().astype(np.uint8), mode="L")
    elif mode == "P" and "transparency" in image.info or mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(path: str, config: ImageCheckConfig | None = None) -> Image.Image:
    """Open, check the size limits, apply EXIF orientation and convert to RGB."""
    config = config or ImageCheckConfig()
    with _open(path) as opened:
        _check_size(path, opened.size, config)
        try:
            opened.load()
            image = ImageOps.exif_transpose(opened)  # a copy: closing `opened` does not free it
        except Exception as e:  # OSError for truncated data; plugins raise others on odd bytes
            raise RecordProblem("image_corrupt", f"{path}: {type(e).__name__}: {e}") from None
    return to_rgb(image)


class ResizeToTensor:
    """A minimal image processor: resize to `size` x `size` and scale to [0, 1], (3, H, W) float.
    For tests and `data check`; training uses the vision tower's own processor."""

    def __init__(self, size: int = 32):
        self.size = size

    def __call__(self, image: Image.Image):
        import torch

        array = np.asarray(image.convert("RGB").resize((self.size, self.size), Image.BICUBIC), dtype=np.float32)
        return torch.from_numpy(array / 255.0).permute(2, 0, 1).contiguous()
